"""Data path: fio on a raw file, a virtfs disk and a qemu-storage-daemon FUSE export.

All three targets live on the same filesystem (one temp dir under ``$TMPDIR``)
and run in the same process tree, side by side:

- ``raw``: a plain file, fio directly on it;
- ``virtfs``: a ``virtfs-mount`` subprocess (embedded controller, temp state
  dir, its sparse default container in that state dir) and a thick disk of the
  test size, so the timed runs measure the data path, not first-write
  allocation; a thin disk's first sequential write is measured once on its own;
- ``qemu``: ``qemu-storage-daemon`` exporting a raw file (file + raw nodes,
  ``cache.direct=off``) over FUSE onto a regular file, when it is installed.

Each target is laid out first with one sequential 1 MiB pass over the whole
file (so reads hit written data everywhere), then the workloads run
interleaved (raw, virtfs, qemu for one workload, then the next), each
``--time_based`` for a few seconds with ``--ioengine=psync``: 1 MiB sequential
write and read (buffered), 4 KiB random read and write (``--direct=1``), at
numjobs 1 and 4, and 16 for the random ones (``--group_reporting``; each job works on its own
slice of the file). Backing data stays in the host page cache
(``--invalidate=0``: the raw file, the virtfs container and the qemu raw file
are all warm after the layout pass), while the FUSE files' own page cache is
dropped (``POSIX_FADV_DONTNEED``) before each run, so a buffered read starts
out going through the daemon: this measures the cost of the path, not of the
disk under it. (virtfs opens files with pyfuse3's default ``keep_cache``, so
without that drop its buffered reads would be served from pages cached by
earlier writes and opens, never reaching the agent.)
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.rig import BIN, MountProc, cpu_seconds, stop_mount_daemon, wait_mounted

from .report import Report, Section, Workload, fmt, more_than
from .report import loadavg as _loadavg
from .report import text_table as _table

TITLE = "data path: fio on a raw file vs a virtfs disk vs a qemu-storage-daemon FUSE export"

MiB = 1 << 20
GiB = 1 << 30

AIM_VS_QEMU = 1.0  # virtfs/qemu throughput, every workload
AIM_VS_RAW_SEQ = 0.5  # virtfs/raw throughput, sequential workloads


@dataclass(frozen=True)
class Job:
    key: str
    title: str
    rw: str
    bs: str
    direct: bool
    numjobs: tuple[int, ...] = (1, 4)

    @property
    def sequential(self) -> bool:
        return self.rw in ("write", "read")

    @property
    def direction(self) -> str:
        return "write" if "write" in self.rw else "read"


JOBS = [
    Job("seqwrite", "seq write 1M, buffered", "write", "1M", False),
    Job("seqread", "seq read 1M, buffered", "read", "1M", False),
    Job("randread", "rand read 4K, direct", "randread", "4k", True, (1, 4, 16)),
    Job("randwrite", "rand write 4K, direct", "randwrite", "4k", True, (1, 4, 16)),
]


@dataclass
class Target:
    name: str
    path: Path
    pid: int | None = None  # the daemon serving it, for its CPU time
    log: Path | None = None
    fuse: bool = True

    def drop_fuse_cache(self) -> None:
        """Drop the FUSE file's own page cache (not the backing file's) before a run."""
        if not self.fuse or not self.path.exists():
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@dataclass
class Result:
    mib_s: float
    iops: float
    p50_us: float
    p99_us: float
    daemon_cpu: float | None  # share of one core the serving daemon used
    seconds: float
    cpu_per_io_us: float | None = None  # the serving daemon's CPU time per I/O


# ---------------------------------------------------------------- helpers


def _first_line(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except OSError as e:
        return f"unavailable ({e.strerror})"
    return (r.stdout or r.stderr).strip().splitlines()[0] if (r.stdout or r.stderr) else "?"


def _fs_type(path: Path) -> str:
    r = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True,
                       check=False)
    return r.stdout.strip() or "?"


def _mem_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0




@contextmanager
def _virtfs_mount(tmp: Path, container_size: int) -> Iterator[tuple[Path, Path, Target]]:
    """A virtfs-mount subprocess with an embedded controller: (mnt, state_dir, target)."""
    mnt, state = tmp / "virtfs-mnt", tmp / "virtfs-state"
    mnt.mkdir()
    state.mkdir(mode=0o700)
    m = MountProc(mnt, state, tmp / "virtfs-mount.log",
                  args=["--default-container-size", str(container_size)])
    try:
        m.start()
        yield mnt, state, Target("virtfs", mnt / "bench", m.pid, m.log_path)
    finally:
        m.close()


@contextmanager
def _qemu_export(tmp: Path, size: int) -> Iterator[Target]:
    """qemu-storage-daemon exporting a raw file over FUSE onto a regular file."""
    raw, exp = tmp / "qemu-raw.img", tmp / "qemu-export"
    with open(raw, "wb") as f:
        f.truncate(size)
    exp.touch()
    log = tmp / "qemu-storage-daemon.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            ["qemu-storage-daemon",
             "--blockdev", f"driver=file,node-name=file0,filename={raw},cache.direct=off",
             "--blockdev", "driver=raw,node-name=raw0,file=file0",
             "--export", f"type=fuse,id=exp0,node-name=raw0,mountpoint={exp},writable=on"],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, cwd=tmp)
    try:
        wait_mounted(exp, proc, log, "qemu-storage-daemon")
        yield Target("qemu", exp, proc.pid, log)
    finally:
        stop_mount_daemon(proc, exp)


def _vdctl(state: Path, *args: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([str(BIN / "vdctl"), "--state-dir", str(state), *args],
                       capture_output=True, text=True, timeout=600, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"vdctl {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return time.perf_counter() - t0


def _fio(cwd: Path, target: Target, name: str, rw: str, bs: str, *, size: int,
         direct: bool = False, numjobs: int = 1, runtime: float | None = None) -> Result:
    """One fio run on target.path; with numjobs > 1 each job gets its own slice of size."""
    per_job = size // numjobs
    cmd = ["fio", f"--name={name}", f"--filename={target.path}", "--ioengine=psync",
           f"--rw={rw}", f"--bs={bs}", f"--direct={int(direct)}", f"--numjobs={numjobs}",
           f"--size={per_job}", "--invalidate=0", "--fallocate=none",
           "--output-format=json"]
    if numjobs > 1:
        cmd += [f"--offset_increment={per_job}", "--group_reporting"]
    if runtime is not None:
        cmd += ["--time_based", f"--runtime={runtime:g}s"]
    target.drop_fuse_cache()
    cpu0 = cpu_seconds(target.pid) if target.pid else 0.0
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False,
                       timeout=(runtime or 0) + 600)
    seconds = time.perf_counter() - t0
    used = cpu_seconds(target.pid) - cpu0 if target.pid else None
    cpu = None if used is None else used / seconds
    if r.returncode != 0:
        tail = target.log.read_text(errors="replace")[-2000:] if target.log else ""
        raise RuntimeError(f"fio {name} on {target.name} failed ({r.returncode}):\n"
                           f"{r.stderr[-2000:]}{r.stdout[-1000:]}\n{tail}")
    out = r.stdout
    data: dict[str, Any] = json.loads(out[out.index("{"):])
    job = data["jobs"][0]
    d = job["write" if "write" in rw else "read"]
    pct = d["clat_ns"].get("percentile", {})
    ios = d.get("total_ios") or 0
    return Result(mib_s=d["bw_bytes"] / MiB, iops=d["iops"],
                  p50_us=pct.get("50.000000", 0) / 1e3, p99_us=pct.get("99.000000", 0) / 1e3,
                  daemon_cpu=cpu, seconds=seconds,
                  cpu_per_io_us=None if used is None or not ios else used / ios * 1e6)


def _ratio(a: Result | None, b: Result | None) -> float | None:
    if a is None or b is None or not b.mib_s:
        return None
    return a.mib_s / b.mib_s




# ---------------------------------------------------------------- section


def _facts(tmp_root: Path) -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "memory_gib": round(_mem_total() / GiB, 1),
        "fio": _first_line(["fio", "--version"]),
        "qemu": (_first_line(["qemu-storage-daemon", "--version"])
                 if shutil.which("qemu-storage-daemon") else "not installed"),
        "tmp_fs": f"{tmp_root} ({_fs_type(tmp_root)})",
        "loadavg": _loadavg(),
    }


def run(report: Report, section: Section) -> None:
    quick = report.quick
    size = 256 * MiB if quick else GiB
    runtime = 1.5 if quick else 5.0
    tmp_root = Path(os.environ.get("TMPDIR", "/tmp"))
    facts = _facts(tmp_root)
    have_qemu = shutil.which("qemu-storage-daemon") is not None
    print(f"datapath: {facts['cpus']} CPUs, kernel {facts['kernel']}, "
          f"{facts['memory_gib']} GiB RAM, {facts['fio']}, qemu: {facts['qemu']}; "
          f"files on {facts['tmp_fs']}; load average {facts['loadavg']}",
          file=report.out, flush=True)
    if not have_qemu:
        print("datapath: qemu column skipped: qemu-storage-daemon is not installed "
              "(Debian package qemu-system-common)", file=report.out, flush=True)

    setup = Workload("setup", "targets, layout pass, one read pass, thin first write",
                     {"file_size": f"{size // MiB} MiB", "fio": "bs=1M, one pass over the "
                      "file, numjobs=1, buffered, no fsync"})
    w = Workload("fio", "raw file vs virtfs (thick disk) vs qemu-storage-daemon FUSE export",
                 {"file_size": f"{size // MiB} MiB", "runtime_per_run": f"{runtime:g} s",
                  "ioengine": "psync", "invalidate": "0 (warm page cache)"})
    t_setup = time.perf_counter()
    results: dict[tuple[str, int, str], Result] = {}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="virtfs-bench-datapath-", dir=tmp_root)))
        work = tmp / "fio-cwd"
        work.mkdir()
        targets: list[Target] = [Target("raw", tmp / "raw.img", fuse=False)]

        report.progress("datapath: starting virtfs-mount")
        mnt, state, vt = stack.enter_context(_virtfs_mount(tmp, 4 * size))
        t_create = _vdctl(state, "disk", "create", vt.path.name, "--size", str(size), "--thick")
        targets.append(vt)
        setup.add("virtfs: thick disk create (allocate + zero, vdctl)", t_create, "s")

        qemu_note = ""
        if have_qemu:
            report.progress("datapath: starting qemu-storage-daemon FUSE export")
            try:
                targets.append(stack.enter_context(_qemu_export(tmp, size)))
            except (RuntimeError, TimeoutError, OSError) as e:
                qemu_note = f"qemu column skipped: qemu-storage-daemon failed to start: {e}"
                print(f"datapath: {qemu_note}", file=report.out, flush=True)
        else:
            qemu_note = "qemu column skipped: qemu-storage-daemon is not installed"

        layout: dict[str, Result] = {}
        for t in targets:
            report.progress(f"datapath: layout pass on {t.name} ({size // MiB} MiB)")
            layout[t.name] = _fio(work, t, f"layout-{t.name}", "write", "1M", size=size)
            setup.add(f"{t.name}: first sequential write of the file", layout[t.name].mib_s,
                      "MiB/s")
        os.sync()
        onepass: dict[str, Result] = {}
        for t in targets:
            report.progress(f"datapath: one sequential read pass on {t.name}")
            onepass[t.name] = _fio(work, t, f"readpass-{t.name}", "read", "1M", size=size)
            setup.add(f"{t.name}: one sequential read pass",
                      onepass[t.name].mib_s, "MiB/s")
            if t.pid:
                setup.add(f"  {t.name} daemon CPU during it",
                          (onepass[t.name].daemon_cpu or 0) * 100, "% core")
        if "qemu" in onepass:
            setup.add("  virtfs/qemu, one read pass",
                      onepass["virtfs"].mib_s / onepass["qemu"].mib_s, "x",
                      more_than(AIM_VS_QEMU))
        setup.add("  virtfs/raw, one read pass",
                  onepass["virtfs"].mib_s / onepass["raw"].mib_s, "x", more_than(AIM_VS_RAW_SEQ))

        setup.note("read pass: backing files warm; on virtfs and qemu the FUSE file's own page "
                   "cache is dropped first, so every byte goes through the daemon")
        report.progress("datapath: thin disk, first sequential write")
        thin = Target("virtfs thin", mnt / "thin", vt.pid, vt.log)
        _vdctl(state, "disk", "create", thin.path.name, "--size", str(size))
        first = _fio(work, thin, "thin-first-write", "write", "1M", size=size)
        setup.add("virtfs thin disk: first sequential write (allocating)", first.mib_s, "MiB/s")
        setup.add("  thin first write / thick first write",
                  first.mib_s / layout["virtfs"].mib_s, "x")
        setup.add("  agent CPU during the thin first write", (first.daemon_cpu or 0) * 100,
                  "% core")
        _vdctl(state, "disk", "rm", thin.path.name)
        os.sync()
        setup.seconds = time.perf_counter() - t_setup
        section.workloads.append(setup)
        report.emit(setup)

        t_w = time.perf_counter()
        for job in JOBS:
            for nj in job.numjobs:
                for t in targets:
                    report.progress(f"datapath: {job.key} x{nj} on {t.name} ({runtime:g} s)")
                    results[(job.key, nj, t.name)] = _fio(
                        work, t, f"{job.key}-{nj}-{t.name}", job.rw, job.bs, size=size,
                        direct=job.direct, numjobs=nj, runtime=runtime)
            os.sync()
        names = [t.name for t in targets]

    # ---- figures (JSON) and the side-by-side table
    head = ["workload", "jobs", "target", "MiB/s", "IOPS", "p50 clat", "p99 clat",
            "daemon CPU", "CPU/IO", "virtfs/raw", "vs aim", "virtfs/qemu", "vs aim"]
    rows = [head]
    misses: list[str] = []
    for job in JOBS:
        for nj in job.numjobs:
            label = f"{job.title}, x{nj}"
            virt = results.get((job.key, nj, "virtfs"))
            for k, name in enumerate(names):
                r = results[(job.key, nj, name)]
                w.add(f"{label}: {name} MiB/s", round(r.mib_s, 2), "MiB/s")
                w.add(f"{label}: {name} IOPS", round(r.iops, 1), "IOPS")
                w.add(f"{label}: {name} p50 clat", round(r.p50_us, 1), "us")
                w.add(f"{label}: {name} p99 clat", round(r.p99_us, 1), "us")
                if r.daemon_cpu is not None:
                    w.add(f"{label}: {name} daemon CPU", round(r.daemon_cpu * 100, 1), "% core")
                if r.cpu_per_io_us is not None:
                    w.add(f"{label}: {name} daemon CPU per I/O", round(r.cpu_per_io_us, 1),
                          "us")
                cells = [job.title if k == 0 else "", str(nj) if k == 0 else "", name,
                         fmt(r.mib_s), fmt(r.iops), f"{fmt(r.p50_us)} us",
                         f"{fmt(r.p99_us)} us",
                         "-" if r.daemon_cpu is None else f"{r.daemon_cpu * 100:.0f}%",
                         "-" if r.cpu_per_io_us is None else f"{fmt(r.cpu_per_io_us)} us",
                         "", "", "", ""]
                if name == "virtfs":
                    vr = _ratio(virt, results.get((job.key, nj, "raw")))
                    vq = _ratio(virt, results.get((job.key, nj, "qemu")))
                    if vr is not None:
                        aim = more_than(AIM_VS_RAW_SEQ) if job.sequential else None
                        f = w.add(f"{label}: virtfs/raw", round(vr, 3), "x", aim)
                        cells[9] = f"{vr:.2f}x"
                        if aim is not None:
                            ratio = f.ratio() or 0.0
                            cells[10] = f"{ratio:.2f}x" + ("" if ratio >= 1 else " MISS")
                            if ratio < 1:
                                misses.append(f"{label}: virtfs/raw {vr:.2f} < "
                                              f"{AIM_VS_RAW_SEQ}")
                    if vq is not None:
                        f = w.add(f"{label}: virtfs/qemu", round(vq, 3), "x",
                                  more_than(AIM_VS_QEMU))
                        ratio = f.ratio() or 0.0
                        cells[11] = f"{vq:.2f}x"
                        cells[12] = f"{ratio:.2f}x" + ("" if ratio >= 1 else " MISS")
                        if ratio < 1:
                            misses.append(f"{label}: virtfs/qemu {vq:.2f} < {AIM_VS_QEMU}")
                rows.append(cells)
    w.table = _table(rows, "<><>>>>>>>>>>")
    w.note(f"aims: virtfs/qemu >= {AIM_VS_QEMU:.1f} on every workload; virtfs/raw >= "
           f"{AIM_VS_RAW_SEQ} on the sequential ones (ratios of MiB/s; 'vs aim' > 1.00x "
           "meets it)")
    w.note("direct=1 is O_DIRECT on the raw file (the disk under it); through virtfs and the "
           "qemu export (cache.direct=off) it bypasses the FUSE page cache only, the daemon "
           "still does buffered I/O on its backing file")
    w.note("backing files warm in the host page cache; the FUSE files' own page cache is "
           "dropped before each run (fio --invalidate=0, then POSIX_FADV_DONTNEED on the FUSE "
           "file); a buffered run longer than one pass re-reads cached pages on all targets")
    w.note("daemon CPU: virtfs-mount / qemu-storage-daemon CPU time over the run's wall time "
           "(100% = one core busy); CPU/IO: that CPU time (utime+stime from /proc/PID/stat, "
           "before and after) over the run's I/O count")
    if qemu_note:
        w.note(qemu_note)
    w.note(f"aims missed: {len(misses)}" + (f" ({'; '.join(misses)})" if misses else ""))
    w.note(f"load average at the end of the section {_loadavg()} "
           f"(at its start {facts['loadavg']}; {facts['cpus']} CPUs)")
    w.seconds = time.perf_counter() - t_w
    section.workloads.append(w)
    report.emit(w)
