"""Imports and first writes (issue 9): an image copied into the mount vs between host files.

Side by side, each the best of two runs, with `sync` before every run so one
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


def _timed(cmd: list[str], before: Callable[[], None]) -> float:
    """Best of two runs of cmd (seconds), before() ahead of each (clean up, then sync)."""
    best = float("inf")
    for _ in range(2):
        before()
        os.sync()
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, timeout=600)
        best = min(best, time.perf_counter() - t0)
    return best


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
                                 "runs": "best of 2, sync before each"})
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
        t_host = _timed(["cp", str(src), str(host)], _rm(host))
        t_ours = _timed(["cp", str(src), str(ours)], _rm(host, ours))
        w.add("cp into a host file", size / MiB / t_host, "MiB/s")
        w.add("cp into the mount (a new thin disk)", size / MiB / t_ours, "MiB/s")
        w.add("  mount / host", round(t_host / t_ours, 3), "x", more_than(0.5))

        report.progress("imports: qemu-img convert")
        conv = ["qemu-img", "convert", "-f", "raw", "-O", "raw"]
        t_host = _timed([*conv, str(src), str(host)], _rm(ours, host))
        t_ours = _timed([*conv, str(src), str(ours)], _rm(host, ours))
        w.add("qemu-img convert -O raw into a host file", size / MiB / t_host, "MiB/s")
        w.add("qemu-img convert -O raw into the mount", size / MiB / t_ours, "MiB/s")
        w.add("  mount / host", round(t_host / t_ours, 3), "x", more_than(0.7))
        _rm(ours, host)()

        report.progress("imports: first sequential write, thin vs thick")
        times: dict[str, float] = {}
        for kind in ("thick", "thin"):
            best = float("inf")
            for i in range(2):
                name = f"{kind}{i}"
                _vdctl(state, "disk", "create", name, "--size", str(size),
                       *(["--thick"] if kind == "thick" else []))
                os.sync()
                t0 = time.perf_counter()
                subprocess.run(["dd", f"if={src}", f"of={mnt / name}", "bs=1M",
                                "conv=notrunc", "status=none"], check=True, timeout=600)
                best = min(best, time.perf_counter() - t0)
                _vdctl(state, "disk", "rm", name)
            times[kind] = best
            w.add(f"first sequential write of a {kind} disk (dd bs=1M)",
                  size / MiB / best, "MiB/s")
        w.add("  thin / thick", round(times["thick"] / times["thin"], 3), "x",
              more_than(0.9))
    w.seconds = time.perf_counter() - t_start
    section.workloads.append(w)
    report.emit(w)
