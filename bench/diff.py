"""Changed-block tracking and incremental backup (issue 17 item 1).

- ``snap_diff``: in-process, no data: a 1 TiB thin disk with every 4 MiB
  segment allocated by one ``disk.map`` record each through ``State.apply``,
  in random order (262,144 extents that do not merge), snapshot ``s1``; then 1%
  of the segments (2,621, at random) get new storage as a copy on write gives
  it (``disk.unmap`` + ``disk.map``) and snapshot ``s2``. Timed: the whole
  ``snap.diff`` s1 -> s2 through the service's own op (``Backup.snap_diff``,
  every page, as vdctl asks for them), the pure walk (``diff.changes``) alone,
  s2 -> s2's disk (nothing changed), and the worst case, every extent changed
  (s2's offsets all moved by a block: a step per extent). The answer is
  checked: exactly the changed segments. Aim: under 1 s.
- ``export``: real processes (a controller, an agent, vdctl): a 1 GiB disk with
  1 MiB segments filled with random data, snapshot, 1% of the segments (10 of
  1,024) rewritten by one 4 KiB write each, snapshot; a full and an incremental
  ``export-diff`` timed, the bytes the controller read during each (its
  ``/proc/PID/io`` rchar: every read syscall, the requests on its socket
  included), and an ``import-diff`` of both into another disk, checked
  against the snapshots (cmp). Aim: the incremental export reads at most 1.1%
  of the disk.
"""

from __future__ import annotations

import filecmp
import os
import random
import subprocess
import tempfile
import time
from array import array
from pathlib import Path

import trio

from controller import diff as DF
from controller.records import ContainerAdd, DiskCreate, DiskMap, DiskUnmap, Piece, SnapCreate
from controller.service.backup import Backup
from controller.service.context import Context
from controller.state import State
from tests.rig import BIN, open_rig

from .report import Report, Section, Workload, less_than

TITLE = "changed-block tracking: snap diff of a 1 TiB disk, export-diff and import-diff"
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
SEG = 4 * MiB


def _build(size: int, changed_share: float, seed: int = 1) -> tuple[State, set[int]]:
    """The state of the snap_diff workload (see the module's docstring): (state, the
    changed segments' indices)."""
    state = State()
    state.apply(ContainerAdd("c0", 1, "/nonexistent/c0.img", 2 * size + GiB, True))
    state.apply(DiskCreate("d", size, SEG, False, None, 1, time.time(), []))
    rnd = random.Random(seed)
    nseg = size // SEG
    order = list(range(nseg))
    rnd.shuffle(order)
    space = state.luns[1].space

    def place(s: int) -> None:
        pieces: list[Piece] = []
        vs = s * SEG
        for off, n in space.plan(SEG):
            pieces.append((vs, n, 1, off))
            vs += n
        state.apply(DiskMap("d", pieces))

    for s in order:
        place(s)
    state.apply(SnapCreate("d", "s1", time.time()))
    changed = set(rnd.sample(range(nseg), int(nseg * changed_share)))
    for s in sorted(changed):
        state.apply(DiskUnmap("d", s * SEG, (s + 1) * SEG))
        place(s)
    state.apply(SnapCreate("d", "s2", time.time()))
    return state, changed


def _paged(state: State, to: str, frm: str) -> tuple[float, list[DF.Change], int]:
    """(seconds, changes, pages) of a whole snap.diff through Backup.snap_diff."""
    backup = Backup(Context(state, None, None))  # type: ignore[arg-type]

    async def go() -> tuple[float, list[DF.Change], int]:
        got: list[DF.Change] = []
        start: int | None = 0
        pages = 0
        t0 = time.perf_counter()
        while start is not None:
            page = await backup.snap_diff(to, frm, start, None)
            got += [DF.Change(*c) for c in page["changes"]]  # type: ignore[attr-defined]
            start = page["next"]  # type: ignore[assignment]
            pages += 1
        return time.perf_counter() - t0, list(DF.join(got)), pages

    return trio.run(go)


def bench_snap_diff(report: Report, section: Section) -> None:
    size = (TiB // 16) if report.quick else TiB
    w = Workload("snap_diff", "snap diff of two snapshots of a fully allocated thin disk, "
                 "from the tables", {"disk": f"{size // GiB} GiB, {size // SEG} extents "
                                     "(4 MiB, random order)", "changed": "1% of segments"})
    report.progress(f"diff: building a {size // GiB} GiB table")
    t0 = t_start = time.perf_counter()
    state, changed = _build(size, 0.01)
    w.add("build (State.apply)", time.perf_counter() - t0, "s")
    s1, s2 = state.snaps["d@s1"], state.snaps["d@s2"]
    assert len(s1.extents) == size // SEG, len(s1.extents)
    reps = 5
    times, pure = [], []
    for _ in range(reps):
        secs, chs, pages = _paged(state, "d@s2", "d@s1")
        times.append(secs)
        t0 = time.perf_counter()
        whole, _ = DF.changes(s1.extents, s2.extents, 0, size)
        pure.append(time.perf_counter() - t0)
    segs = {o // SEG for c in chs for o in range(c.offset, c.end, SEG)}
    if segs != changed or not all(c.data for c in chs) or whole != chs:
        raise RuntimeError(f"snap diff answered {len(segs)} segments, {len(changed)} changed")
    same = []
    for _ in range(reps):
        secs, none, _p = _paged(state, "d", "d@s2")
        same.append(secs)
        if none:
            raise RuntimeError("snap diff of a disk and its last snapshot is not empty")
    w.add("snap.diff s1 -> s2, every page (the op)", min(times), "s", less_than(1.0))
    w.add("  median of runs", sorted(times)[reps // 2], "s")
    w.add("  pages", pages, "")
    w.add("  ranges (adjacent segments joined; exactly the changed ones)", len(chs), "")
    w.add("diff.changes (the reference walk, a step per extent)", min(pure), "s")
    w.add("snap.diff s2 -> disk, nothing changed", min(same), "s", less_than(1.0))
    # the worst case: every extent changed (s2's offsets all moved by a block)
    a_cols = s1.extents.columns(0, size)
    b_cols = s2.extents.columns(0, size)
    of = array("q")
    of.frombytes(b_cols[3])
    moved = array("q", (o + 4096 for o in of)).tobytes()
    worst = []
    for _ in range(reps):
        t0 = time.perf_counter()
        chs, _ = DF.changes_cols(a_cols, [*b_cols[:3], moved, b_cols[4]], 0, size)
        worst.append(time.perf_counter() - t0)
    if DF.changed_bytes(chs) != (size, 0):
        raise RuntimeError("every extent moved, yet not everything changed")
    w.add("every extent changed (diff.changes_cols, one window)", min(worst), "s")
    w.params["runs"] = f"best of {reps}"
    w.seconds = time.perf_counter() - t_start
    report.emit(w)
    section.workloads.append(w)


def _rchar(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/PID/io")


def bench_export(report: Report, section: Section) -> None:
    size = 256 * MiB if report.quick else GiB
    seg = MiB
    w = Workload("export", "export-diff (full, then 1% changed) and import-diff, real "
                 "processes", {"disk": f"{size // MiB} MiB, {seg // MiB} MiB segments, "
                               "random data", "changed": "1% of segments, a 4 KiB write "
                               "each"})
    tmp_root = Path(os.environ.get("TMPDIR", "/tmp"))
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="virtfs-bench-diff-", dir=tmp_root) as t:
        tmp = Path(t)
        with open_rig(tmp, [("c1", 4 * size)]) as rig:
            rig.vdctl("disk", "create", "d", "--size", str(size), "--segment-size", str(seg))
            rig.vdctl("disk", "create", "r", "--size", "1M")
            report.progress("diff: filling the disk")
            with open(rig.mnt / "d", "r+b") as f:
                for _ in range(size // (16 * MiB)):
                    f.write(os.urandom(16 * MiB))
                os.fsync(f.fileno())
            rig.vdctl("snap", "create", "d@s1")
            rnd = random.Random(2)
            nseg = size // seg
            picks = rnd.sample(range(nseg), nseg // 100)
            fd = os.open(rig.mnt / "d", os.O_WRONLY)
            try:
                for s in picks:
                    os.pwrite(fd, os.urandom(4096), s * seg + rnd.randrange(seg // 4096) * 4096)
                os.fsync(fd)
            finally:
                os.close(fd)
            rig.vdctl("snap", "create", "d@s2")
            pid = rig.controller.pid
            vd = [str(BIN / "vdctl"), "--state-dir", str(rig.state)]
            full, inc = tmp / "full.diff", tmp / "inc.diff"

            def timed(args: list[str]) -> tuple[float, int]:
                r0 = _rchar(pid)
                t0 = time.perf_counter()
                subprocess.run([*vd, *args], check=True, capture_output=True, timeout=900)
                return time.perf_counter() - t0, _rchar(pid) - r0

            report.progress("diff: exports")
            t_full, read_full = timed(["disk", "export-diff", "d@s1", str(full)])
            t_inc, read_inc = timed(["disk", "export-diff", "d@s2", "--from-snap", "s1",
                                     str(inc)])
            report.progress("diff: imports")
            t_imp_full, _ = timed(["disk", "import-diff", str(full), "r"])
            t_imp_inc, _ = timed(["disk", "import-diff", str(inc), "r"])
            for snap in ("s1", "s2"):
                if not filecmp.cmp(rig.mnt / f"r@{snap}", rig.mnt / f"d@{snap}",
                                   shallow=False):
                    raise RuntimeError(f"r@{snap} differs from d@{snap}")
            w.add("full export", size / MiB / t_full, "MiB/s")
            w.add("  controller read / disk", read_full / size, "x")
            w.add("incremental export (1% changed)", t_inc, "s")
            w.add("  controller read / disk", 100 * read_inc / size, "%", less_than(1.1))
            w.add("  stream / disk", 100 * inc.stat().st_size / size, "%")
            w.add("full import (through the mount)", size / MiB / t_imp_full, "MiB/s")
            w.add("incremental import", t_imp_inc, "s")
            w.note("the imports restored r@s1 and r@s2 equal to d@s1 and d@s2 (cmp)")
    w.seconds = time.perf_counter() - t_start
    report.emit(w)
    section.workloads.append(w)


def run(report: Report, section: Section) -> None:
    bench_snap_diff(report, section)
    bench_export(report, section)
