"""Online migration (issue 7): I/O latency while a disk moves, and migration throughput
against a plain ``cp``.

Everything is real: a controller process, a ``virtfs-mount`` agent on a FUSE mount, two
file containers on the same host file system (one temp dir under ``$TMPDIR``), ``vdctl
disk migrate`` and fio (the rig: tests/rig.py). Two workloads, each repeated (the spread
is reported):

``latency``: a disk (1 GiB; 256 MiB with --quick), prefilled with random data so that
every segment is allocated on the source container. fio 4 KiB random writes, then
random reads, ``O_DIRECT``, psync, 1 job, iodepth 1: once at rest (time based), once
while ``vdctl disk migrate --to OTHER`` moves the disk. fio logs every I/O's completion
latency with a Unix timestamp (``--write_lat_log --log_unix_epoch=1``); only the I/Os
that completed between the job's start and end (``vdctl job ls``: the controller's own
clock) count. The disk goes back and forth between the two containers. The migration's
rate under the random-write load is reported too. For contrast, the same fio runs while
a plain ``cp`` + ``sync FILE`` of as many bytes runs between two files on the containers'
file system (no virtfs): what a bulk copy alone does to this host's latencies.

``throughput``: the same disk, idle: ``vdctl disk migrate`` with the page cache
dropped first (``sync; echo 3 > /proc/sys/vm/drop_caches``), against ``cp`` of a file
of the same size (random data) between two files in the same directory as the
containers, also from a dropped cache and followed by ``sync FILE`` of the target, so
both are durable when timed (the migration makes each copied range durable before it
marks it). Also the idle migration from a warm cache (the way back).

Earlier versions also ran design variants on a patched controller child (copier steps
of 4 MiB; a first write that copies the whole segment); their figures are in the
README's history paragraph.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from tests.rig import Rig, drop_caches, end_process, open_rig, prefill

from .report import Report, Section, Workload, fmt, less_than, more_than
from .report import loadavg as _loadavg
from .report import percentile as _pct
from .report import spread as _spread
from .report import text_table as _table

TITLE = ("online migration: fio latency at rest vs during `disk migrate`, migration vs cp "
         "throughput")

MiB = 1 << 20
GiB = 1 << 30

AIM_WRITE_P99 = 3.0  # p99 during migration / p99 at rest, 4 KiB random writes
AIM_READ_P99 = 1.2  # the same, random reads
AIM_VS_CP = 0.7  # idle migration rate / cp rate (both from a dropped cache, durable)


# ---------------------------------------------------------------- fio


def _fio_cmd(path: Path, rw: str, size: int, extra: Sequence[str] = ()) -> list[str]:
    return ["fio", "--name=m", f"--filename={path}", f"--rw={rw}", "--bs=4k", "--direct=1",
            "--ioengine=psync", "--iodepth=1", "--numjobs=1", f"--size={size}",
            "--invalidate=0", "--fallocate=none", "--randrepeat=0", "--norandommap",
            "--output-format=json", *extra]


def _read_clat_log(path: Path, lo_ms: float | None = None,
                   hi_ms: float | None = None) -> list[int]:
    """Completion latencies (ns) from a fio latency log, optionally cut to [lo, hi] (Unix ms)."""
    out = []
    with open(path) as f:
        for line in f:
            t, v = line.split(",", 2)[:2]
            ts = int(t)
            if (lo_ms is None or ts >= lo_ms) and (hi_ms is None or ts <= hi_ms):
                out.append(int(v))
    return out


@dataclass
class Lat:
    n: int
    p50_us: float
    p99_us: float
    p999_us: float
    max_us: float
    over_1ms: int

    @classmethod
    def of(cls, ns: list[int]) -> Lat:
        s = sorted(ns)
        return cls(len(s), _pct(s, 50) / 1e3, _pct(s, 99) / 1e3, _pct(s, 99.9) / 1e3,
                   (s[-1] if s else 0) / 1e3, sum(1 for v in s if v > 1_000_000))


def _fio_at_rest(rig: Rig, work: Path, disk: str, rw: str, size: int, runtime: float,
                 tag: str) -> Lat:
    prefix = work / tag
    cmd = _fio_cmd(rig.mnt / disk, rw, size, ["--time_based", f"--runtime={runtime:g}s",
                                              f"--write_lat_log={prefix}",
                                              "--log_unix_epoch=1"])
    r = subprocess.run(cmd, cwd=work, capture_output=True, text=True, check=False,
                       timeout=runtime + 300)
    if r.returncode != 0:
        raise RuntimeError(f"fio {tag} failed ({r.returncode}): {r.stderr[-2000:]}")
    lat = Lat.of(_read_clat_log(Path(f"{prefix}_clat.1.log")))
    for p in work.glob(f"{tag}_*.log"):
        p.unlink()
    return lat


@dataclass
class Moved:
    lat: Lat | None  # the I/O that completed inside the migration's window
    seconds: float  # the job's start to end, controller clock
    wall: float  # the vdctl command's wall time (its progress poll is 0.5 s)
    rate_mib_s: float


def _migrate(rig: Rig, disk: str, to: str, size: int) -> Moved:
    t0 = time.perf_counter()
    rig.vdctl("disk", "migrate", disk, "--to", to)
    wall = time.perf_counter() - t0
    j = rig.last_job()
    if j["state"] != "done" or j["disk"] != disk:
        raise RuntimeError(f"migration job did not finish: {j}")
    secs = float(j["ended"]) - float(j["started"])
    return Moved(None, secs, wall, size / MiB / secs)


def _fio_during_migration(rig: Rig, work: Path, disk: str, rw: str, size: int, to: str,
                          tag: str) -> Moved:
    """fio runs (time based, long), the disk moves to `to`, fio is stopped; the
    latencies of the I/O that completed inside the job's [started, ended] count."""
    prefix = work / tag
    cmd = _fio_cmd(rig.mnt / disk, rw, size, ["--time_based", "--runtime=1800s",
                                              f"--write_lat_log={prefix}",
                                              "--log_unix_epoch=1"])
    fio = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        time.sleep(1.5)  # fio is running
        if fio.poll() is not None:
            raise RuntimeError(f"fio {tag} ended early: {fio.communicate()[1][-2000:]}")
        moved = _migrate(rig, disk, to, size)
        if fio.poll() is not None:
            raise RuntimeError(f"fio {tag} ended during the migration: "
                               f"{fio.communicate()[1][-2000:]}")
        j = rig.last_job()
        time.sleep(0.3)
    finally:
        end_process(fio, signal.SIGINT, wait=60)
        fio.communicate()
    ns = _read_clat_log(Path(f"{prefix}_clat.1.log"), float(j["started"]) * 1000,
                        float(j["ended"]) * 1000)
    for p in work.glob(f"{tag}_*.log"):
        p.unlink()
    moved.lat = Lat.of(ns)
    return moved


def _fio_during_cp(rig: Rig, work: Path, disk: str, rw: str, size: int, src: Path,
                   tag: str) -> Lat:
    """The same fio while a plain `cp` + `sync FILE` of size bytes runs on the containers'
    file system (no virtfs involved): what any bulk copy on this host does to the I/O."""
    prefix = work / tag
    cmd = _fio_cmd(rig.mnt / disk, rw, size, ["--time_based", "--runtime=1800s",
                                              f"--write_lat_log={prefix}",
                                              "--log_unix_epoch=1"])
    dst = src.with_name("cp-dst.img")
    fio = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        time.sleep(1.5)
        t0 = time.time()
        subprocess.run(["cp", str(src), str(dst)], check=True)
        subprocess.run(["sync", str(dst)], check=True)
        t1 = time.time()
        if fio.poll() is not None:
            raise RuntimeError(f"fio {tag} ended early: {fio.communicate()[1][-2000:]}")
        time.sleep(0.3)
    finally:
        end_process(fio, signal.SIGINT, wait=60)
        fio.communicate()
        dst.unlink(missing_ok=True)
    ns = _read_clat_log(Path(f"{prefix}_clat.1.log"), t0 * 1000, t1 * 1000)
    for p in work.glob(f"{tag}_*.log"):
        p.unlink()
    return Lat.of(ns)


# ---------------------------------------------------------------- the section


def run(report: Report, section: Section) -> None:
    quick = report.quick
    size = 256 * MiB if quick else GiB
    reps = 1 if quick else 3
    runtime = 4.0 if quick else 10.0
    tmp_root = Path(os.environ.get("TMPDIR", "/tmp"))
    print(f"movement: disk {size // MiB} MiB, {reps} repetitions, files under {tmp_root}; "
          f"load average {_loadavg()}", file=report.out, flush=True)

    lat_w = Workload("latency", "fio 4 KiB O_DIRECT, 1 job, QD1: at rest vs while the disk "
                     "migrates (only I/O inside the job's window)",
                     {"disk": f"{size // MiB} MiB, prefilled (every segment allocated)",
                      "at_rest_runtime": f"{runtime:g} s", "repetitions": reps})
    thr_w = Workload("throughput", "migration of an idle disk vs cp + sync of the same "
                     "bytes (page cache dropped before each)",
                     {"bytes": f"{size // MiB} MiB", "repetitions": reps})

    lat: dict[str, dict[str, list[Lat]]] = {k: {"rest": [], "move": [], "cp": []}
                                            for k in ("randwrite", "randread")}
    load_rate: list[float] = []
    cold: list[Moved] = []
    warm: list[Moved] = []
    cp_rate: list[float] = []
    cache_note: str | None = None

    t0 = time.perf_counter()
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="virtfs-bench-movement-main-", dir=tmp_root)))
        rig = stack.enter_context(open_rig(tmp, [("c1", 2 * size), ("c2", 2 * size)]))
        work = rig.tmp / "fio-cwd"
        work.mkdir()
        report.progress(f"movement: prefilling a {size // MiB} MiB disk on c1")
        rig.vdctl("disk", "create", "d", "--size", str(size), "--container", "c1")
        prefill(rig.mnt / "d", size, rig.tmp)
        where = "c1"
        rows = rig.entries("d")
        on_src = sum(e["length"] for e in rows if e["container"] == "c1")
        if on_src != size:
            raise RuntimeError(f"prefill left {size - on_src} bytes unallocated on c1")
        cp_src = rig.tmp / "cp-src.img"
        with open(cp_src, "wb") as f:
            for _ in range(size // (64 * MiB)):
                f.write(os.urandom(64 * MiB))
            os.fsync(f.fileno())

        for rep in range(reps):
            # ---- latency: at rest, then during a migration, writes then reads
            for rw in ("randwrite", "randread"):
                other = "c2" if where == "c1" else "c1"
                report.progress(f"movement: rep {rep + 1}/{reps}: {rw} at rest ({runtime:g} s)")
                lat[rw]["rest"].append(_fio_at_rest(rig, work, "d", rw, size, runtime,
                                                    f"{rw}-rest-{rep}"))
                report.progress(f"movement: rep {rep + 1}/{reps}: {rw} while migrating "
                                f"{where} -> {other}")
                m = _fio_during_migration(rig, work, "d", rw, size, other, f"{rw}-move-{rep}")
                assert m.lat is not None
                lat[rw]["move"].append(m.lat)
                if rw == "randwrite":
                    load_rate.append(m.rate_mib_s)
                where = other
                report.progress(f"movement: rep {rep + 1}/{reps}: {rw} while a plain cp + "
                                "sync of the same size runs")
                lat[rw]["cp"].append(_fio_during_cp(rig, work, "d", rw, size, cp_src,
                                                    f"{rw}-cp-{rep}"))
            # ---- throughput: cp cold, migration cold, migration warm
            report.progress(f"movement: rep {rep + 1}/{reps}: cp + sync, page cache dropped")
            cp_dst = rig.tmp / "cp-dst.img"
            cache_note = drop_caches() or cache_note
            t = time.perf_counter()
            subprocess.run(["cp", str(cp_src), str(cp_dst)], check=True)
            subprocess.run(["sync", str(cp_dst)], check=True)
            cp_rate.append(size / MiB / (time.perf_counter() - t))
            cp_dst.unlink()
            other = "c2" if where == "c1" else "c1"
            report.progress(f"movement: rep {rep + 1}/{reps}: idle migration {where} -> "
                            f"{other}, page cache dropped")
            cache_note = drop_caches() or cache_note
            cold.append(_migrate(rig, "d", other, size))
            where = other
            other = "c2" if where == "c1" else "c1"
            report.progress(f"movement: rep {rep + 1}/{reps}: idle migration {where} -> "
                            f"{other}, warm cache")
            warm.append(_migrate(rig, "d", other, size))
            where = other
        rig.vdctl("check")

    # ---- figures
    rows_t = [["workload", "rep", "p50 rest", "p50 moving", "p99 rest", "p99 moving",
               "p99 ratio", "p99.9 moving", ">1 ms moving", "I/Os moving", "p50 / p99 cp",
               "p99 ratio cp"]]
    for rw, aim in (("randwrite", AIM_WRITE_P99), ("randread", AIM_READ_P99)):
        ratios = []
        cp_ratios = []
        for k, (r, ml, lc) in enumerate(zip(lat[rw]["rest"], lat[rw]["move"], lat[rw]["cp"],
                                            strict=True)):
            ratio = ml.p99_us / r.p99_us
            ratios.append(ratio)
            cp_ratios.append(lc.p99_us / r.p99_us)
            rows_t.append([rw if k == 0 else "", str(k + 1), f"{fmt(r.p50_us)} us",
                           f"{fmt(ml.p50_us)} us", f"{fmt(r.p99_us)} us",
                           f"{fmt(ml.p99_us)} us", f"{ratio:.2f}x", f"{fmt(ml.p999_us)} us",
                           f"{ml.over_1ms} ({100 * ml.over_1ms / max(1, ml.n):.2f}%)",
                           fmt(ml.n), f"{fmt(lc.p50_us)} / {fmt(lc.p99_us)} us",
                           f"{cp_ratios[-1]:.2f}x"])
            lat_w.add(f"{rw} rep {k + 1}: p50 at rest / moving",
                      f"{fmt(r.p50_us)} / {fmt(ml.p50_us)}", "us")
            lat_w.add(f"{rw} rep {k + 1}: p99 at rest / moving",
                      f"{fmt(r.p99_us)} / {fmt(ml.p99_us)}", "us")
        lat_w.add(f"{rw}: p99 moving / at rest (median of {len(ratios)}; range "
                  f"{min(ratios):.2f}-{max(ratios):.2f})", round(statistics.median(ratios), 3),
                  "x", less_than(aim))
        lat_w.add(f"{rw}: p99 during a plain cp + sync / at rest (median; range "
                  f"{min(cp_ratios):.2f}-{max(cp_ratios):.2f})",
                  round(statistics.median(cp_ratios), 3), "x")
    lat_w.add("migration rate under the randwrite load", _spread(load_rate), "MiB/s")
    lat_w.table = _table(rows_t, "<>>>>>>>>>>>")
    lat_w.note("percentiles computed exactly from fio's per-I/O completion-latency log "
               "(nearest rank), cut to the job's [started, ended] window from `vdctl job ls`")
    lat_w.note("cp: the same fio while a plain `cp` + `sync FILE` of the same size runs "
               "between two files on the containers' file system (no virtfs involved), cut to "
               "the cp's window: what a bulk copy alone does to this host's I/O latency")
    lat_w.note(f"aims: p99 moving <= {AIM_WRITE_P99:g}x at rest (writes), "
               f"<= {AIM_READ_P99:g}x (reads)")
    lat_w.note(f"migration rate under the randwrite load: {_spread(load_rate)} MiB/s "
               "(median (min-max)); idle, warm cache: "
               f"{_spread([m.rate_mib_s for m in warm])} MiB/s")
    lat_w.seconds = time.perf_counter() - t0
    section.workloads.append(lat_w)
    report.emit(lat_w)

    ratios_cp = [m.rate_mib_s / c for m, c in zip(cold, cp_rate, strict=True)]
    thr_w.add("cp + sync, cold cache (median (min-max))", _spread(cp_rate), "MiB/s")
    thr_w.add("migration, idle, cold cache (job start to end)",
              _spread([m.rate_mib_s for m in cold]), "MiB/s")
    thr_w.add("  its duration (job) / vdctl wall time",
              f"{_spread([m.seconds for m in cold])} / {_spread([m.wall for m in cold])}", "s")
    thr_w.add("migration, idle, warm cache", _spread([m.rate_mib_s for m in warm]), "MiB/s")
    thr_w.add("migration under fio 4 KiB randwrite (warm cache)", _spread(load_rate), "MiB/s")
    thr_w.add(f"migration / cp, cold (median of {len(ratios_cp)}; range "
              f"{min(ratios_cp):.2f}-{max(ratios_cp):.2f})",
              round(statistics.median(ratios_cp), 3), "x", more_than(AIM_VS_CP))
    thr_w.note("both durable when timed: cp is followed by `sync FILE` of the target; the "
               "migration makes each copied range durable before it marks it")
    thr_w.note("cp and the containers are in the same directory (same host file system)")
    if cache_note:
        thr_w.note(cache_note)
    thr_w.seconds = 0.0
    section.workloads.append(thr_w)
    report.emit(thr_w)
