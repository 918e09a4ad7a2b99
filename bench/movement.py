"""Online migration (issue 7): I/O latency while a disk moves, migration throughput, and
the first write to a moving segment against copying the whole segment first.

Everything is real: a controller process, ``virtfs-mount`` agents on FUSE mounts, two
file containers on the same host file system (one temp dir under ``$TMPDIR``), ``vdctl
disk migrate`` and fio. Three workloads, each repeated (the spread is reported):

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
marks it: sync_file_range + a 4 KiB RWF_DSYNC write). Also the idle migration from a
warm cache (the way back), and, as a diagnostic, idle migrations on two controller
children side by side, interleaved: one unpatched, one whose copier copies and marks
4 MiB a step instead of 1 MiB (``controller.moves.next_copy`` patched).

``first_write``: the latency of one 4 KiB ``O_DIRECT`` write to a segment that is being
moved, the copier held by the test hook (``VIRTFS_TEST_HOLD_COPIER``), one write per
segment at a random block: (a) virtfs as it is (the write fault copies only the blocks
the write touches), (b) a variant that copies the whole segment (4 MiB) before letting
the first write through, as LVM thin, qcow2 or RBD do with a chunk, cluster or object,
and (c) the same writes at rest (allocated segments, nothing moving). The controller
for (a) and (b) runs in a child Python process started by this module
(``python -m bench.movement --serve-controller``) with, for (b),
``_prepare_moving_write`` patched to widen the write to the whole touched segments.
Both patch the job's moves-in-flight limit (4 in the product) so that every segment is
moving at once (with the stock limit only 4 segments are moving at a time, the others
are plain writes), and poll the hold file every 0.5 s instead of 0.05 s (256 held
copiers polling 20 times a second would load the controller's event loop). The child
also times the steps of each write fault (``--profile``: the whole ``disk.fault``, the
durable block copy, the ``move.mark`` commit wait, the pushes) and the workload prints
their medians.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .datapath import _wait_mounted
from .report import Report, Section, Workload, fmt, less_than, more_than
from .report import loadavg as _loadavg
from .report import percentile as _pct
from .report import spread as _spread
from .report import text_table as _table

TITLE = ("online migration: fio latency at rest vs during `disk migrate`, migration vs cp "
         "throughput, first writes to moving segments (virtfs vs whole-segment copy)")

BIN = Path(sys.executable).parent
MiB = 1 << 20
GiB = 1 << 30
BLOCK = 4096
SEG = 4 * MiB
HOLD_ENV = "VIRTFS_TEST_HOLD_COPIER"

AIM_WRITE_P99 = 3.0  # p99 during migration / p99 at rest, 4 KiB random writes
AIM_READ_P99 = 1.2  # the same, random reads
AIM_VS_CP = 0.7  # idle migration rate / cp rate (both from a dropped cache, durable)


# ---------------------------------------------------------------- processes




def _end(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, wait: float = 15) -> None:
    """End one process we started (signal, wait, kill); never raises."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        except OSError:
            pass


@dataclass
class Rig:
    """One controller, its two containers and one agent, in tmp."""

    tmp: Path
    state: Path
    mnt: Path
    logs: list[Path] = field(default_factory=list)

    def vdctl(self, *args: str, timeout: float = 900) -> str:
        r = subprocess.run([str(BIN / "vdctl"), "--state-dir", str(self.state), *args],
                           capture_output=True, text=True, timeout=timeout, check=False)
        if r.returncode != 0:
            tail = "".join(p.read_text(errors="replace")[-1500:] for p in self.logs)
            raise RuntimeError(f"vdctl {' '.join(args)} failed ({r.returncode}): "
                               f"{r.stderr.strip()}\n{tail}")
        return r.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.vdctl(*args, "--format", "json"))

    def entries(self, disk: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.json("disk", "map", disk)["entries"]
        return rows

    def job(self, jid: int) -> dict[str, Any]:
        for j in self.json("job", "ls"):
            if j["id"] == jid:
                return dict(j)
        raise RuntimeError(f"job {jid} is not listed")

    def last_job(self) -> dict[str, Any]:
        rows = self.json("job", "ls")
        return dict(max(rows, key=lambda j: j["id"]))


@contextmanager
def _rig(tmp_root: Path, tag: str, size: int, *, child: list[str] | None = None,
         hold: Path | None = None) -> Iterator[Rig]:
    """Controller (virtfs-controller, or this module's patched child with the options
    in child), containers c1 and c2 (sparse files of 2x size), one agent on a mount."""
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix=f"virtfs-bench-movement-{tag}-", dir=tmp_root)))
        state, mnt = tmp / "state", tmp / "mnt"
        state.mkdir(mode=0o700)
        mnt.mkdir()
        rig = Rig(tmp, state, mnt)
        env = dict(os.environ)
        env.pop(HOLD_ENV, None)
        if hold is not None:
            env[HOLD_ENV] = str(hold)
        if child is None:
            cmd = [str(BIN / "virtfs-controller"), "--state-dir", str(state)]
        else:
            cmd = [sys.executable, "-m", "bench.movement", "--serve-controller", str(state),
                   *child]
        clog = tmp / "controller.log"
        rig.logs.append(clog)
        with open(clog, "wb") as f:
            ctl = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f,
                                   stderr=subprocess.STDOUT, env=env,
                                   cwd=Path(__file__).resolve().parent.parent)
        stack.callback(_end, ctl)
        sock = state / "controller.sock"
        deadline = time.monotonic() + 30
        while True:
            if ctl.poll() is not None:
                raise RuntimeError(f"controller exited {ctl.returncode}:\n"
                                   + clog.read_text(errors="replace")[-3000:])
            if sock.exists():
                try:
                    rig.vdctl("status")
                    break
                except RuntimeError:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError("controller did not answer:\n" + clog.read_text()[-3000:])
            time.sleep(0.1)
        for c in ("c1", "c2"):
            rig.vdctl("container", "add", c, str(tmp / f"{c}.img"), "--size", str(2 * size))
        alog = tmp / "agent.log"
        rig.logs.append(alog)
        with open(alog, "wb") as f:
            agent = subprocess.Popen(
                [str(BIN / "virtfs-mount"), str(mnt), "--state-dir", str(state),
                 "--controller", f"unix:{sock}"],
                stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp)

        def stop_agent() -> None:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True,
                           check=False)
            try:
                agent.wait(10)  # it ends by itself once unmounted
            except subprocess.TimeoutExpired:
                _end(agent, wait=10)

        stack.callback(stop_agent)  # runs before the controller's _end
        _wait_mounted(mnt, agent, alog, "virtfs-mount")
        yield rig


def _drop_caches() -> str | None:
    """sync, then drop the page cache; a reason it could not, or None."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        return f"could not drop the page cache ({e.strerror}); figures are from a warm cache"
    return None


# ---------------------------------------------------------------- fio


def _fio_cmd(path: Path, rw: str, size: int, extra: Sequence[str] = ()) -> list[str]:
    return ["fio", "--name=m", f"--filename={path}", f"--rw={rw}", "--bs=4k", "--direct=1",
            "--ioengine=psync", "--iodepth=1", "--numjobs=1", f"--size={size}",
            "--invalidate=0", "--fallocate=none", "--randrepeat=0", "--norandommap",
            "--output-format=json", *extra]


def _prefill(rig: Rig, disk: str, size: int) -> None:
    """Every byte written with random data (every segment allocated), then fsynced."""
    r = subprocess.run(["fio", "--name=fill", f"--filename={rig.mnt / disk}", "--rw=write",
                        "--bs=1M", f"--size={size}", "--ioengine=psync", "--refill_buffers",
                        "--end_fsync=1", "--fallocate=none", "--output-format=json"],
                       cwd=rig.tmp, capture_output=True, text=True, check=False, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"prefill failed: {r.stderr[-2000:]}")


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
        _end(fio, signal.SIGINT, wait=60)
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
        _end(fio, signal.SIGINT, wait=60)
        fio.communicate()
        dst.unlink(missing_ok=True)
    ns = _read_clat_log(Path(f"{prefix}_clat.1.log"), t0 * 1000, t1 * 1000)
    for p in work.glob(f"{tag}_*.log"):
        p.unlink()
    return Lat.of(ns)


# ---------------------------------------------------------------- first writes


def _timed_writes(path: Path, offsets: list[int]) -> list[float]:
    """One 4 KiB O_DIRECT write at each offset; each write's latency in µs."""
    buf = mmap.mmap(-1, BLOCK)
    buf.write(os.urandom(BLOCK))
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    out = []
    try:
        for off in offsets:
            t0 = time.perf_counter_ns()
            n = os.pwrite(fd, buf, off)
            out.append((time.perf_counter_ns() - t0) / 1e3)
            if n != BLOCK:
                raise RuntimeError(f"short write at {off}: {n}")
    finally:
        os.close(fd)
        buf.close()
    return out


def _wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.5)


@dataclass
class FirstWrites:
    at_rest: list[float]
    moving: list[float]
    copied_to_target: int  # bytes on the target container after the first writes
    profile: dict[str, list[float]]  # controller-side step times of the faults (µs)


def _first_writes(tmp_root: Path, variant: str, size: int, seed: int) -> FirstWrites:
    nseg = size // SEG
    rnd = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="virtfs-bench-movement-hold-",
                                     dir=tmp_root) as htmp_s, ExitStack() as stack:
        htmp = Path(htmp_s)
        hold = htmp / "hold-copier"
        prof = htmp / "profile.json"
        rig = stack.enter_context(_rig(
            tmp_root, f"fw-{variant}", size, hold=hold,
            child=["--variant", variant, "--moves", str(nseg), "--hold-poll", "0.5",
                   "--profile", str(prof)]))
        rig.vdctl("disk", "create", "d", "--size", str(size), "--container", "c1")
        _prefill(rig, "d", size)
        path = rig.mnt / "d"
        segs = list(range(nseg))

        def offsets() -> list[int]:
            rnd.shuffle(segs)
            return [s * SEG + rnd.randrange(SEG // BLOCK) * BLOCK for s in segs]

        at_rest = _timed_writes(path, offsets())
        hold.touch()
        jid = int(rig.vdctl("disk", "migrate", "d", "--to", "c2", "--no-wait").strip())

        def all_moving() -> bool:
            rows = rig.entries("d")
            return sum(1 for e in rows if e["container"] == "c1"
                       and "nowrite" in e["state"]) >= nseg
        _wait(all_moving, 120, "every segment to be moving")
        moving = _timed_writes(path, offsets())
        copied = sum(e["length"] for e in rig.entries("d") if e["container"] == "c2")
        if rig.job(jid)["state"] != "running":
            raise RuntimeError(f"job {jid} ended while the copier was held")
        hold.unlink()  # let the copier go and the job end: the variant must still finish
        # the move, and a controller stopped mid-job could be slow to stop (before 216f13e
        # it waited for ever on its job.end commit) and not write the profile
        _wait(lambda: rig.job(jid)["state"] != "running", 300, f"job {jid} to end")
        if rig.job(jid)["state"] != "done":
            raise RuntimeError(f"job {jid} did not finish: {rig.job(jid)}")
        stack.close()  # agent and controller stopped: the profile is written
        profile: dict[str, list[float]] = (json.loads(prof.read_text()) if prof.exists()
                                           else {})
        # the prefill's allocating faults come first: keep the first writes' own
        for k in ("fault", "prepare"):
            if k in profile:
                profile[k] = profile[k][-len(moving):]
    return FirstWrites(at_rest, moving, copied, profile)


# ---------------------------------------------------------------- copier variants

COPIER_VARIANTS = [
    ("product: 1 MiB copier steps (controller child, unpatched)", []),
    ("4 MiB copier steps (one per segment)", ["--chunk-blocks", "1024"]),
]


def _copier_variants(tmp_root: Path, size: int, reps: int) -> list[list[float]]:
    """Idle migrations from a dropped cache, each variant on its own controller child,
    all set up at once and interleaved: MiB/s of each migration, per variant."""
    out: list[list[float]] = [[] for _ in COPIER_VARIANTS]
    with ExitStack() as stack:
        rigs = []
        for k, (_label, args) in enumerate(COPIER_VARIANTS):
            rig = stack.enter_context(_rig(tmp_root, f"copier{k}", size, child=args))
            rig.vdctl("disk", "create", "d", "--size", str(size), "--container", "c1")
            _prefill(rig, "d", size)
            rigs.append(rig)
        where = "c1"
        for rep in range(reps):
            other = "c2" if where == "c1" else "c1"
            order = list(range(len(rigs)))
            if rep % 2:
                order.reverse()
            for k in order:
                _drop_caches()
                out[k].append(_migrate(rigs[k], "d", other, size).rate_mib_s)
            where = other
    return out


# ---------------------------------------------------------------- the section








def run(report: Report, section: Section) -> None:
    quick = report.quick
    size = 256 * MiB if quick else GiB
    reps = 1 if quick else 3
    runtime = 4.0 if quick else 10.0
    fw_size = 256 * MiB if quick else GiB
    fw_reps = 1 if quick else 5
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
    fw_w = Workload("first_write", "first 4 KiB O_DIRECT write to a moving segment (copier "
                    "held): virtfs vs copy-whole-segment-first vs at rest",
                    {"disk": f"{fw_size // MiB} MiB, {fw_size // SEG} segments, one write each",
                     "repetitions": fw_reps})

    lat: dict[str, dict[str, list[Lat]]] = {k: {"rest": [], "move": [], "cp": []}
                                            for k in ("randwrite", "randread")}
    load_rate: list[float] = []
    cold: list[Moved] = []
    warm: list[Moved] = []
    cp_rate: list[float] = []
    cache_note: str | None = None

    t0 = time.perf_counter()
    with ExitStack() as stack:
        rig = stack.enter_context(_rig(tmp_root, "main", size))
        work = rig.tmp / "fio-cwd"
        work.mkdir()
        report.progress(f"movement: prefilling a {size // MiB} MiB disk on c1")
        rig.vdctl("disk", "create", "d", "--size", str(size), "--container", "c1")
        _prefill(rig, "d", size)
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
            cache_note = _drop_caches() or cache_note
            t = time.perf_counter()
            subprocess.run(["cp", str(cp_src), str(cp_dst)], check=True)
            subprocess.run(["sync", str(cp_dst)], check=True)
            cp_rate.append(size / MiB / (time.perf_counter() - t))
            cp_dst.unlink()
            other = "c2" if where == "c1" else "c1"
            report.progress(f"movement: rep {rep + 1}/{reps}: idle migration {where} -> "
                            f"{other}, page cache dropped")
            cache_note = _drop_caches() or cache_note
            cold.append(_migrate(rig, "d", other, size))
            where = other
            other = "c2" if where == "c1" else "c1"
            report.progress(f"movement: rep {rep + 1}/{reps}: idle migration {where} -> "
                            f"{other}, warm cache")
            warm.append(_migrate(rig, "d", other, size))
            where = other
        rig.vdctl("check")

    # ---- first writes: stock vs whole-segment, each on its own controller child
    fws: dict[str, list[FirstWrites]] = {"stock": [], "whole": []}
    for rep in range(fw_reps):
        for variant in (("stock", "whole") if rep % 2 == 0 else ("whole", "stock")):
            report.progress(f"movement: rep {rep + 1}/{fw_reps}: first writes, {variant}")
            fws[variant].append(_first_writes(tmp_root, variant, fw_size, 1000 * rep + 7))

    # ---- what would make the copier faster: the product's knobs, patched in a child
    report.progress("movement: idle migrations with copier variants")
    copier = list(zip([label for label, _ in COPIER_VARIANTS],
                      _copier_variants(tmp_root, size, reps), strict=True))

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
    cp_med = statistics.median(cp_rate)
    for label, rates in copier:
        thr_w.add(f"variant: {label}", _spread(rates), "MiB/s")
        thr_w.add("  vs cp (median)", round(statistics.median(rates) / cp_med, 3), "x")
    thr_w.note("variants: the same idle migration from a dropped cache, on controller "
               "children (one unpatched, one with the copier's step patched to 4 MiB), set up "
               "side by side and interleaved (diagnostic, not the product)")
    thr_w.note("both durable when timed: cp is followed by `sync FILE` of the target; the "
               "migration makes each copied range durable before it marks it")
    thr_w.note("cp and the containers are in the same directory (same host file system)")
    if cache_note:
        thr_w.note(cache_note)
    thr_w.seconds = 0.0
    section.workloads.append(thr_w)
    report.emit(thr_w)

    rows_f = [["rep", "variant", "p50", "p99", "max", "at rest p50", "at rest p99",
               "bytes copied to target"]]
    summary: dict[str, dict[str, list[float]]] = {}
    for rep in range(fw_reps):
        for variant in ("stock", "whole"):
            fw = fws[variant][rep]
            mv, rs = sorted(fw.moving), sorted(fw.at_rest)
            s = summary.setdefault(variant, {"p50": [], "p99": [], "rp50": [], "rp99": []})
            s["p50"].append(_pct(mv, 50))
            s["p99"].append(_pct(mv, 99))
            s["rp50"].append(_pct(rs, 50))
            s["rp99"].append(_pct(rs, 99))
            rows_f.append([str(rep + 1), variant, f"{fmt(_pct(mv, 50))} us",
                           f"{fmt(_pct(mv, 99))} us", f"{fmt(mv[-1])} us",
                           f"{fmt(_pct(rs, 50))} us", f"{fmt(_pct(rs, 99))} us",
                           f"{fw.copied_to_target // MiB} MiB ({fw.copied_to_target:,})"])
    rest = summary["stock"]["rp50"] + summary["whole"]["rp50"]
    rest99 = summary["stock"]["rp99"] + summary["whole"]["rp99"]
    fw_w.add("(a) virtfs, first write to a moving segment: p50", _spread(summary["stock"]["p50"]),
             "us")
    fw_w.add("(a) virtfs: p99", _spread(summary["stock"]["p99"]), "us")
    fw_w.add("(b) whole segment copied first: p50", _spread(summary["whole"]["p50"]), "us")
    fw_w.add("(b) whole segment copied first: p99", _spread(summary["whole"]["p99"]), "us")
    fw_w.add("(c) plain write at rest: p50", _spread(rest), "us")
    fw_w.add("(c) plain write at rest: p99", _spread(rest99), "us")
    fw_w.add("(b)/(a) p50", round(statistics.median(summary["whole"]["p50"])
                                  / statistics.median(summary["stock"]["p50"]), 2), "x")
    fw_w.add("(a)/(c) p50", round(statistics.median(summary["stock"]["p50"])
                                  / statistics.median(rest), 2), "x")
    for variant in ("stock", "whole"):
        steps: dict[str, list[float]] = {}
        for fw in fws[variant]:
            for step, v in fw.profile.items():
                steps.setdefault(step, []).extend(v)
        if steps.get("fault"):
            fw_w.note(f"{variant}, controller side (median us per fault): " + ", ".join(
                f"{k} {fmt(statistics.median(v))}" for k, v in steps.items() if v)
                + " (fault: the whole disk.fault call; prepare: _prepare_moving_write; "
                "copy: the durable block copy; journal_wait: the move.mark commit)")
    fw_w.table = _table(rows_f, "<<>>>>>>")
    fw_w.note("median (min-max) over the repetitions (the order of (a) and (b) alternates); "
              "each repetition is a fresh controller child, containers and agent; (c) is the "
              "same kind of writes (one per segment, random block) before the migration")
    fw_w.note("bytes copied to target: what the target container holds after the first "
              "writes (the copier held): (a) the written blocks, (b) whole segments")
    fw_w.note(f"load average at the end {_loadavg()}")
    fw_w.seconds = 0.0
    section.workloads.append(fw_w)
    report.emit(fw_w)


# ---------------------------------------------------------------- the controller child


def _serve_controller(state_dir: str, variant: str, moves: int | None,
                      chunk_blocks: int | None, hold_poll: float | None,
                      profile: str | None = None) -> int:
    """The product's controller daemon with, optionally: the job's moves-in-flight limit
    set (moves), the copier's step set (chunk_blocks, 4 KiB blocks), the hold file polled
    every hold_poll s, and for variant 'whole' the write fault widened to whole segments.
    With profile (a path), the time of each write fault's steps (the block copy, the
    journal commit wait, the pushes, the whole fault) is written there as JSON at exit."""
    import trio

    import controller.moves as moves_mod
    import controller.service.jobs as jobs
    import controller.service.movement as movement
    from controller import daemon
    from controller.extents import MOVING
    from controller.service import Service

    if moves is not None:
        jobs.MOVES_IN_FLIGHT = moves  # type: ignore[misc]
    if chunk_blocks is not None:
        next_copy = moves_mod.next_copy
        moves_mod.next_copy = lambda a, limit=chunk_blocks: next_copy(a, limit)  # type: ignore
    if hold_poll is not None:
        async def slow_hold() -> None:
            path = os.environ.get(HOLD_ENV)
            while path and os.path.exists(path):  # noqa: ASYNC110, ASYNC240 - a test hook
                await trio.sleep(hold_poll)

        movement._test_hold = slow_hold  # type: ignore[assignment]
    if variant == "whole":
        orig = Service._prepare_moving_write

        async def whole(self: Any, d: Any, start: int, end: int, exclude: Any) -> bool:
            touched = [e for e in d.extents.stored_in(start, end) if e.flags & MOVING]
            if touched:  # copy and mark every unmarked block of the touched segments
                start = min(e.vstart for e in touched)
                end = max(e.vend for e in touched)
            return bool(await orig(self, d, start, end, exclude))

        Service._prepare_moving_write = whole  # type: ignore[method-assign]
    if profile is None:
        return daemon.main(["--state-dir", state_dir])

    import contextvars

    from controller.journal import Journal

    in_fault: contextvars.ContextVar[bool] = contextvars.ContextVar("in_fault", default=False)
    times: dict[str, list[float]] = {"fault": [], "prepare": [], "copy": [],
                                     "journal_wait": [], "push": []}

    def timed(cls: Any, name: str, key: str, only_in_fault: bool) -> None:
        orig_m = getattr(cls, name)

        async def wrapper(*a: Any, **kw: Any) -> Any:
            if only_in_fault and not in_fault.get():
                return await orig_m(*a, **kw)
            t = time.perf_counter()
            try:
                return await orig_m(*a, **kw)
            finally:
                times[key].append((time.perf_counter() - t) * 1e6)
        setattr(cls, name, wrapper)

    timed(Service, "_copy", "copy", True)
    timed(Journal, "wait_durable", "journal_wait", True)
    timed(Service, "_push_update", "push", True)
    orig_prep = Service._prepare_moving_write

    async def prep(self: Any, *a: Any, **kw: Any) -> bool:
        token = in_fault.set(True)
        t = time.perf_counter()
        try:
            return bool(await orig_prep(self, *a, **kw))
        finally:
            times["prepare"].append((time.perf_counter() - t) * 1e6)
            in_fault.reset(token)

    Service._prepare_moving_write = prep  # type: ignore[method-assign]
    orig_fault = Service.disk_fault

    async def fault(self: Any, name: str, offset: int, length: int, write: bool,
                    conn: Any) -> Any:
        t = time.perf_counter()
        try:
            return await orig_fault(self, name, offset, length, write, conn)
        finally:
            if write:
                times["fault"].append((time.perf_counter() - t) * 1e6)

    Service.disk_fault = fault  # type: ignore[method-assign]
    try:
        return daemon.main(["--state-dir", state_dir])
    finally:
        with open(profile, "w") as f:
            json.dump(times, f)


def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.movement")
    p.add_argument("--serve-controller", metavar="STATE_DIR", required=True)
    p.add_argument("--variant", choices=["stock", "whole"], default="stock")
    p.add_argument("--moves", type=int, help="moves in flight per job (product: 4)")
    p.add_argument("--chunk-blocks", type=int, help="copier step in 4 KiB blocks (product: 256)")
    p.add_argument("--hold-poll", type=float, help="hold-file poll interval (product: 0.05 s)")
    p.add_argument("--profile", metavar="FILE", help="write fault step times here at exit")
    args = p.parse_args(argv)
    return _serve_controller(args.serve_controller, args.variant, args.moves,
                             args.chunk_blocks, args.hold_poll, args.profile)


if __name__ == "__main__":
    sys.exit(_main())
