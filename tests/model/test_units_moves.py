"""The durable record of segments being moved (docs/movement.md), in State.apply.

Moves (alternate location + block bitmap) must survive merges, splits, discards,
shrinks, removals, replay and checkpoints, and never leak or share space: the
groundwork that online migration, copy-on-write and drain stand on.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from stateimage import format1, image

from controller.bitmap import Bitmap
from controller.checkpoint import Snapshot, from_format1, from_parts
from controller.consistency import check
from controller.extents import MOVING
from controller.records import (
    ContainerAdd,
    ContainerFail,
    DiskClone,
    DiskCreate,
    DiskMap,
    DiskRename,
    DiskResize,
    DiskRm,
    DiskUnmap,
    JobAbort,
    JobEnd,
    JobStart,
    MoveAbort,
    MoveCommit,
    MoveMark,
    MoveStart,
    Record,
    SnapCreate,
    SnapRm,
    SnapRollback,
)
from controller.state import State
from controller.tables import StateError

B = 4096
SEG = 4 * B


def base() -> State:
    s = State()
    for name, lun, size in (("c1", 1, 256 * B), ("c2", 2, 256 * B)):
        s.apply(ContainerAdd(name, lun, f"/{name}", size, True))
    s.apply(DiskCreate("t", 64 * B, SEG, False, None, 1, 1.0, []))
    return s


def alloc(s: State, seg: int, lun: int, off: int) -> None:
    s.apply(DiskMap("t", [(seg * SEG, SEG, lun, off)]))


def start(s: State, seg: int, lun: int, off: int, length: int = SEG) -> None:
    s.apply(MoveStart("t", seg * SEG, length, lun, off))


def clean(s: State) -> None:
    assert check(s) == [], check(s)


def test_move_commit_frees_the_old_location_and_merges_again():
    s = base()
    for k in range(3):  # three contiguous segments: one extent
        alloc(s, k, 1, k * SEG)
    assert len(s.disks["t"].extents) == 1
    start(s, 1, 2, SEG)
    d = s.disks["t"]
    assert len(d.extents) == 3 and d.extents.find(SEG).flags == MOVING
    assert s.luns[2].used == SEG
    clean(s)
    s.apply(MoveMark("t", SEG, [(0, 1), (2, 2)]))
    with pytest.raises(StateError, match="1 blocks are not"):
        s.apply(MoveCommit("t", SEG))
    s.apply(MoveMark("t", SEG, [(1, 1)]))
    s.apply(MoveCommit("t", SEG))
    e = d.extents.find(SEG)
    assert (e.lun, e.offset, e.flags) == (2, SEG, 0) and not d.alts
    assert s.luns[1].used == 2 * SEG and s.luns[2].used == SEG
    clean(s)
    # moving the others next to it puts the disk back in one extent
    for k in (0, 2):
        start(s, k, 2, k * SEG)
        s.apply(MoveMark("t", k * SEG, [(0, 4)]))
        s.apply(MoveCommit("t", k * SEG))
    assert len(d.extents) == 1 and s.luns[1].used == 0
    clean(s)


def test_moving_segment_never_merges_and_rm_frees_both_locations():
    """The defect: an alternate location was keyed by a vstart that a merge changed."""
    s = base()
    alloc(s, 0, 1, 0)
    start(s, 0, 2, 0)
    alloc(s, 1, 1, SEG)  # contiguous on c1 with the moving segment: must not merge
    d = s.disks["t"]
    assert len(d.extents) == 2 and 0 in d.alts
    clean(s)
    s.apply(DiskRm("t"))
    assert s.luns[1].used == 0 and s.luns[2].used == 0
    clean(s)


def test_abort_keeps_the_old_location():
    s = base()
    alloc(s, 0, 1, 0)
    start(s, 0, 2, 8 * B)
    s.apply(MoveMark("t", 0, [(0, 4)]))
    s.apply(MoveAbort("t", 0))
    e = s.disks["t"].extents.find(0)
    assert (e.lun, e.offset, e.flags) == (1, 0, 0) and s.luns[2].used == 0
    clean(s)


def test_discard_and_shrink_over_a_moving_segment():
    s = base()
    alloc(s, 0, 1, 0)
    alloc(s, 1, 1, SEG)
    start(s, 0, 2, 0)
    start(s, 1, 2, SEG)
    s.apply(DiskUnmap("t", SEG, 2 * SEG))
    assert s.luns[2].used == SEG and 1 * SEG not in s.disks["t"].alts
    clean(s)
    # a shrink into the middle of the moving segment: bitmap and alternate shrink
    s.apply(DiskResize("t", B + 100, []))
    a = s.disks["t"].alts[0]
    assert a.bitmap.nblocks == 2 and s.luns[2].used == 2 * B
    clean(s)
    # cutting a moving segment's head is refused, and changes nothing
    before = image(s)
    with pytest.raises(StateError, match="cut the head"):
        s.apply(DiskUnmap("t", 0, B))
    assert image(s) == before


@pytest.mark.parametrize("rec,msg", [
    ({"vstart": 0, "length": SEG, "lun": 2, "offset": 1}, "not free"),
    ({"vstart": 0, "length": 2 * SEG, "lun": 2, "offset": 0}, "not inside one extent"),
    ({"vstart": 8 * SEG, "length": SEG, "lun": 2, "offset": 0}, "not inside one extent"),
    ({"vstart": 0, "length": SEG, "lun": 7, "offset": 0}, "not free"),
    ({"vstart": 0, "length": True, "lun": 2, "offset": 0}, "bad move.start field"),
])
def test_bad_move_start_changes_nothing(rec, msg):
    s = base()
    alloc(s, 0, 1, 0)
    before = image(s)
    with pytest.raises(StateError, match=msg):
        s.apply_wire({"op": "move.start", "name": "t", **rec})
    assert image(s) == before


def test_jobs_and_container_flags_survive_replay_and_checkpoint():
    s = base()
    recs: list[Record] = []

    def do(r: Record) -> None:
        s.apply(r)
        recs.append(r)

    do(JobStart(1, "drain", None, 1, None, 5.0))
    assert s.luns[1].draining
    do(ContainerFail("c2"))
    do(JobStart(2, "migrate", "t", None, 2, 6.0, (("t", 1, 1),)))
    do(DiskRename("t", "u"))
    assert s.jobs[2].disk == "u" and s.jobs[2].placed == [("u", 1, 1)]
    do(JobAbort(2))  # journaled: a restart rolls the job back
    assert s.jobs[2].aborting
    do(JobEnd(1, "done", "", 7.0))
    with pytest.raises(StateError):
        s.apply(JobAbort(1))
    assert not s.luns[1].draining and s.luns[2].failed
    assert s.luns[1].drained  # a drain done: placement keeps off it until restored
    with pytest.raises(StateError):
        s.apply(JobEnd(1, "done", "", 8.0))
    replay = base()
    for r in recs:
        replay.apply_wire(r.to_wire())
    assert image(replay) == image(s)
    snap = Snapshot(s)
    try:
        again = from_parts(snap.parts())
    finally:
        snap.release()
    assert image(again) == image(s)
    assert image(from_format1(format1(s))) == image(s)


def test_draining_is_derived_from_the_jobs_and_written_for_older_readers():
    """A container drains while a drain job runs off it; checkpoints still carry the
    flag (a controller from before reads it) but loading one takes it from the jobs."""
    s = base()
    s.apply(JobStart(1, "drain", None, 1, None, 5.0))
    s.apply(JobStart(2, "drain", None, 1, 2, 5.5))
    assert s.draining_luns() == {1} and s.luns[1].draining and not s.luns[2].draining
    assert s.luns[1].to_dict()["state"] == "draining"
    w = format1(s)
    assert [c["draining"] for c in w["containers"]] == [True, False]
    snap = Snapshot(s)
    parts = list(snap.parts())
    snap.release()
    assert [c["draining"] for c in parts[0]["containers"]] == [True, False]
    w["containers"][1]["draining"] = True  # not read back: the jobs say
    parts[0]["containers"][1]["draining"] = True
    for t in (from_format1(w), from_parts(parts)):
        assert t.draining_luns() == {1} and t.luns[1].draining and not t.luns[2].draining
    s.apply(JobEnd(1, "done", "", 6.0))
    assert s.luns[1].draining  # job 2 still drains it
    s.apply(JobEnd(2, "aborted", "", 7.0))
    assert not s.draining_luns() and not s.luns[1].draining


class Moves(RuleBasedStateMachine):
    """Random allocations, moves, marks, commits, aborts, discards, shrinks and grows:
    check() stays clean, replay gives the same state, and a checkpoint round-trips."""

    def __init__(self) -> None:
        super().__init__()
        self.s = base()
        self.recs: list[Record] = []

    def do(self, r: Record) -> bool:
        try:
            self.s.apply(r)
        except StateError:
            return False
        self.recs.append(r)
        return True

    def free_at(self, lun: int, n: int) -> int | None:
        sp = self.s.luns[lun].space
        return next((o for o, ln in sp.ranges() if ln >= n), None)

    @rule(seg=st.integers(0, 15), lun=st.sampled_from([1, 2]))
    def allocate(self, seg: int, lun: int) -> None:
        d = self.s.disks["t"]
        if seg * SEG >= d.size:
            return
        n = min(SEG, d.size - seg * SEG)
        off = self.free_at(lun, -(-n // B) * B)
        if off is not None and d.extents.is_gap(seg * SEG, seg * SEG + n):
            assert self.do(DiskMap("t", [(seg * SEG, n, lun, off)]))

    @rule(data=st.data())
    def move(self, data: st.DataObject) -> None:
        d = self.s.disks["t"]
        still = [e for e in d.extents if not e.flags & MOVING]
        if not still:
            return
        e = data.draw(st.sampled_from(still))
        seg = data.draw(st.integers(e.vstart // SEG, (e.vend - 1) // SEG))
        lo, hi = max(e.vstart, seg * SEG), min(e.vend, (seg + 1) * SEG)
        other = 2 if e.lun == 1 else 1
        off = self.free_at(other, -(-(hi - lo) // B) * B)
        if off is not None:
            assert self.do(MoveStart("t", lo, hi - lo, other, off))

    @rule(data=st.data())
    def mark(self, data: st.DataObject) -> None:
        d = self.s.disks["t"]
        if not d.alts:
            return
        vs = data.draw(st.sampled_from(sorted(d.alts)))
        n = d.alts[vs].bitmap.nblocks
        first = data.draw(st.integers(0, n - 1))
        count = data.draw(st.integers(1, n - first))
        assert self.do(MoveMark("t", vs, [(first, count)]))

    @rule(data=st.data(), commit=st.booleans())
    def finish(self, data: st.DataObject, commit: bool) -> None:
        d = self.s.disks["t"]
        if not d.alts:
            return
        vs = data.draw(st.sampled_from(sorted(d.alts)))
        if commit:
            n = d.alts[vs].bitmap.nblocks
            self.do(MoveMark("t", vs, [(0, n)]))
        assert self.do(MoveCommit("t", vs) if commit else MoveAbort("t", vs))

    @rule(a=st.integers(0, 16), n=st.integers(1, 2))
    def discard(self, a: int, n: int) -> None:
        d = self.s.disks["t"]
        start, end = min(a * SEG, d.size), min((a + n) * SEG, d.size)
        self.do(DiskUnmap("t", start, end))

    @rule(size=st.integers(1, 64 * B) | st.integers(48 * B, 64 * B))
    def resize(self, size: int) -> None:
        self.do(DiskResize("t", size, []))

    # snapshots and clones share storage with the disk (same family, same vstart)
    @rule(n=st.integers(0, 3))
    def snap(self, n: int) -> None:
        self.do(SnapCreate("t", f"s{n}", 1.0))

    @rule(n=st.integers(0, 3))
    def snap_rm(self, n: int) -> None:
        self.do(SnapRm(f"t@s{n}"))

    @rule(n=st.integers(0, 3), k=st.integers(0, 1))
    def clone(self, n: int, k: int) -> None:
        self.do(DiskClone(f"t@s{n}", f"c{k}", 2.0))

    @rule(k=st.integers(0, 1))
    def clone_rm(self, k: int) -> None:
        self.do(DiskRm(f"c{k}"))

    @rule(n=st.integers(0, 3))
    def rollback(self, n: int) -> None:
        self.do(SnapRollback(f"t@s{n}"))

    @rule(data=st.data(), k=st.integers(0, 1))
    def clone_write(self, data: st.DataObject, k: int) -> None:
        """A clone's own new segment (what a copy-on-write leaves behind)."""
        c = self.s.disks.get(f"c{k}")
        if c is None:
            return
        seg = data.draw(st.integers(0, 15))
        if seg * SEG >= c.size:
            return
        lo = seg * SEG
        hi = min(c.size, lo + SEG)
        if not c.extents.is_gap(lo, hi):
            return
        off = self.free_at(1, -(-(hi - lo) // B) * B)
        if off is not None:
            assert self.do(DiskMap(f"c{k}", [(lo, hi - lo, 1, off)]))

    @invariant()
    def consistent(self) -> None:
        assert check(self.s) == [], check(self.s)
        d = self.s.disks["t"]
        for vs, a in d.alts.items():
            assert d.extents.find(vs).flags & MOVING and isinstance(a.bitmap, Bitmap)

    def teardown(self) -> None:
        replay = base()  # the records as the journal holds them
        for r in self.recs:
            replay.apply_wire(r.to_wire())
        assert image(replay) == image(self.s)
        snap = Snapshot(self.s)
        try:
            assert image(from_parts(snap.parts(max_bytes=64))) == image(self.s)
        finally:
            snap.release()


TestMoves = Moves.TestCase
TestMoves.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])


@st.composite
def _bitmap_ops(draw: Any) -> tuple[int, list[tuple[int, int]], int, int]:
    n = draw(st.integers(0, 300))
    ops = []
    for _ in range(draw(st.integers(0, 8))):
        if n:
            s = draw(st.integers(0, n - 1))
            ops.append((s, draw(st.integers(0, n - s))))
    a = draw(st.integers(0, n))
    return n, ops, a, draw(st.integers(a, n))


@given(_bitmap_ops())
@settings(max_examples=400, deadline=None)
def test_bitmap_matches_a_list_model(case: tuple[int, list[tuple[int, int]], int, int]) -> None:
    n, ops, lo, hi = case
    bm, model = Bitmap(n), [False] * n
    for s, c in ops:
        assert bm.set_range(s, c) == sum(1 for i in range(s, s + c) if not model[i])
        model[s : s + c] = [True] * c
    assert bm.count() == sum(model)
    assert bm.count_range(lo, hi - lo) == sum(model[lo:hi])
    want, i = [], lo
    while i < hi:
        j = i
        while j < hi and model[j] == model[i]:
            j += 1
        want.append((i, j - i, model[i]))
        i = j
    assert list(bm.runs(lo, hi)) == want
    assert bm.first_clear(lo) == next((k for k in range(lo, n) if not model[k]), None)
    assert [bm.slice(lo, hi - lo).test(k) for k in range(hi - lo)] == model[lo:hi]
    assert Bitmap(n, bm.to_bytes()) == bm


def test_referenced_all_matches_referenced_piece_by_piece():
    """The ordered walk (a whole table at once) gives what a lookup per piece gives."""
    import random

    rnd = random.Random(7)
    for _ in range(100):
        s = base()
        offs = rnd.sample(range(0, 256), 200)
        for v in rnd.sample(range(64), 40):
            s.apply(DiskMap("t", [(v * B, B, 1, offs.pop() * B)]))
        for k in range(rnd.randint(1, 3)):
            s.apply(SnapCreate("t", f"s{k}", 0.0))
            for v in rnd.sample(range(64), 8):
                if s.disks["t"].extents.find(v * B):
                    s.apply(DiskUnmap("t", v * B, (v + 1) * B))
                s.apply(DiskMap("t", [(v * B, B, 1, offs.pop() * B)]))
        for t in (s.disks["t"], *s.snaps.values()):
            pieces = list(t.extents)
            assert s.referenced_all(t.family, pieces, skip=t) == [
                s.referenced(t.family, e.vstart, e.vend, e.lun, e.offset, skip=t)
                for e in pieces]
        clean(s)
