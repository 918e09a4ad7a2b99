"""Imports and first writes (issue 9): an image copied into the mount vs between host files.

Side by side, each the best of three runs, the two sides alternating (a load
that comes and goes hits both alike), with `sync` before every run so one
run's dirty pages do not slow the next: `cp` of an image into the mount vs
`cp` between two files in the same host directory; `qemu-img convert -O raw`
into the mount vs into a host file; the first sequential write (dd, 1 MiB
blocks, no fsync) of a thin disk vs a thick disk of the same size.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from .datapath import _vdctl, _virtfs_mount
from .report import Report, Section, Workload, more_than

TITLE = "imports: cp and qemu-img convert into the mount, first writes of thin disks"
MiB = 1 << 20
GiB = 1 << 30
ROUNDS = 3  # each pair of runs alternates this many times; the best of each counts


def _pair(a: list[str], b: list[str], before: Callable[[], None],
          rounds: int = ROUNDS) -> tuple[float, float]:
    """Best times (seconds) of commands a and b, run alternately (so a load that comes
    and goes hits both alike), before() ahead of each run (clean up), then sync."""
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for i, cmd in enumerate((a, b)):
            before()
            os.sync()
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, timeout=600)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1]


def _rm(*paths: Path) -> Callable[[], None]:
    def clean() -> None:
        for p in paths:
            p.unlink(missing_ok=True)
    return clean


def run(report: Report, section: Section) -> None:
    size = 256 * MiB if report.quick else GiB
    t_start = time.perf_counter()
    tmp_root = Path(os.environ.get("TMPDIR", "/tmp"))
    w = Workload("imports", "an image into the mount vs between host files; thin vs thick "
                 "first write", {"image": f"{size // MiB} MiB of random data",
                                 "runs": f"best of {ROUNDS}, alternating, sync before "
                                 "each"})
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="virtfs-bench-imports-", dir=tmp_root)))
        src = tmp / "image.raw"
        with open(src, "wb") as f:
            for _ in range(size // (64 * MiB)):
                f.write(os.urandom(64 * MiB))
        report.progress("imports: starting virtfs-mount")
        mnt, state, _target = stack.enter_context(_virtfs_mount(tmp, 4 * size))
        host, ours = tmp / "copy.raw", mnt / "copy.raw"

        report.progress("imports: cp")
        t_host, t_ours = _pair(["cp", str(src), str(host)], ["cp", str(src), str(ours)],
                               _rm(host, ours))
        w.add("cp into a host file", size / MiB / t_host, "MiB/s")
        w.add("cp into the mount (a new thin disk)", size / MiB / t_ours, "MiB/s")
        w.add("  mount / host", round(t_host / t_ours, 3), "x", more_than(0.5))

        report.progress("imports: qemu-img convert")
        conv = ["qemu-img", "convert", "-f", "raw", "-O", "raw"]
        t_host, t_ours = _pair([*conv, str(src), str(host)], [*conv, str(src), str(ours)],
                               _rm(host, ours))
        w.add("qemu-img convert -O raw into a host file", size / MiB / t_host, "MiB/s")
        w.add("qemu-img convert -O raw into the mount", size / MiB / t_ours, "MiB/s")
        w.add("  mount / host", round(t_host / t_ours, 3), "x", more_than(0.7))
        _rm(ours, host)()

        report.progress("imports: first sequential write, thin vs thick")
        times = {"thick": float("inf"), "thin": float("inf")}
        for i in range(ROUNDS):
            for kind in ("thick", "thin"):
                name = f"{kind}{i}"
                _vdctl(state, "disk", "create", name, "--size", str(size),
                       *(["--thick"] if kind == "thick" else []))
                os.sync()
                t0 = time.perf_counter()
                subprocess.run(["dd", f"if={src}", f"of={mnt / name}", "bs=1M",
                                "conv=notrunc", "status=none"], check=True, timeout=600)
                times[kind] = min(times[kind], time.perf_counter() - t0)
                _vdctl(state, "disk", "rm", name)
        for kind in ("thick", "thin"):
            w.add(f"first sequential write of a {kind} disk (dd bs=1M)",
                  size / MiB / times[kind], "MiB/s")
        w.add("  thin / thick", round(times["thick"] / times["thin"], 3), "x",
              more_than(0.9))
    w.seconds = time.perf_counter() - t_start
    section.workloads.append(w)
    report.emit(w)
