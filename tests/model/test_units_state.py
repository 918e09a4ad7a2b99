"""controller/state.py: apply() of every record kind, replay == live, and check()."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from stateimage import format1, image

from controller.allocator import FreeSpace
from controller.bitmap import Bitmap
from controller.checkpoint import Snapshot, from_format1, from_parts
from controller.consistency import Problem, check
from controller.protocol import BLOCK_SIZE
from controller.records import (
    ContainerAdd,
    ContainerRm,
    ControllerBoot,
    DiskCreate,
    DiskMap,
    DiskRename,
    DiskResize,
    DiskRm,
    DiskUnmap,
    MoveStart,
    Record,
)
from controller.state import State
from controller.tables import StateError, round_up

B = BLOCK_SIZE


def add_container(s: State, name: str, lun: int, size: int) -> ContainerAdd:
    rec = ContainerAdd(name, lun, f"/dev/null/{name}", size, True)
    s.apply(rec)
    return rec


def disk_rec(name: str, size: int, pieces: list[list[int]] | None = None, *,
             thick: bool = False, home: int = 1, pin: int | None = None) -> DiskCreate:
    return DiskCreate(name, size, 4 * B, thick, pin, home, 1.0,
                      [tuple(p) for p in pieces or []])


def wire_disk_rec(name: str, size: int, pieces: object) -> dict[str, Any]:
    """disk_rec's wire form, with any pieces (bad ones too)."""
    return {**disk_rec(name, size).to_wire(), "map": pieces}


def plan(s: State, length: int, vstart: int, prefer: int | None = None) -> list[list[int]]:
    """What the service does: place round_up(length) bytes, short tail clipped."""
    need = round_up(length)
    if not need:
        return []
    conts = sorted(s.containers.values(), key=lambda c: (c.lun != prefer, -c.space.free, c.lun))
    pieces: list[list[int]] = []
    pos, remaining = vstart, need
    for c in conts:
        take = min(remaining, c.space.free)
        if not take:
            continue
        for off, n in c.space.plan(take):
            pieces.append([vstart + (pos - vstart), n, c.lun, off])
            pos += n
        remaining -= take
        if not remaining:
            break
    assert not remaining, "test planned more than is free"
    pieces[-1][1] -= need - length
    return pieces


def errors(s: State) -> list[str]:
    return [p.message for p in check(s) if p.level == "error"]


def two_containers() -> State:
    s = State()
    add_container(s, "c1", 1, 64 * B + 100)
    add_container(s, "c2", 2, 32 * B)
    return s


# ---------------------------------------------------------------- each record kind


def test_container_add_and_rm():
    s = two_containers()
    assert s.containers["c1"].usable == 64 * B and s.containers["c1"].used == 0
    assert s.next_lun == 3 and s.luns[2].name == "c2"
    with pytest.raises(StateError):
        add_container(s, "c1", 9, 10 * B)  # duplicate name
    with pytest.raises(StateError):
        add_container(s, "c9", 2, 10 * B)  # duplicate LUN
    s.apply(disk_rec("d", 5 * B, [[0, 5 * B, 2, 0]], thick=True, home=2))
    with pytest.raises(StateError, match="still holds"):
        s.apply(ContainerRm("c2"))
    s.apply(ContainerRm("c1"))
    assert "c1" not in s.containers and 1 not in s.luns
    with pytest.raises(StateError):
        s.apply(ContainerRm("c1"))
    assert check(s) == []


def test_disk_create_thick_with_short_tail():
    s = two_containers()
    s.apply(disk_rec("d", 12345, plan(s, 12345, 0, 1), thick=True))
    d = s.disks["d"]
    assert d.allocated == 12345 and d.extents.mapped_bytes == 12345
    assert s.containers["c1"].used == 4 * B  # 12345 rounded up to blocks
    assert check(s) == []
    with pytest.raises(StateError):
        s.apply(disk_rec("d", 1))


@pytest.mark.parametrize("pieces,why", [
    ([[0, B, 7, 0]], "no container"),
    ([[1, B, 1, 0]], "misaligned"),
    ([[0, B, 1, 1]], "misaligned"),
    ([[0, 0, 1, 0]], "misaligned"),
    ([[0, 2 * B, 1, 0]], "past disk"),
    ([[0, 100, 1, 0]], "short piece"),
    ([[0, B, 1, 64 * B]], "fit"),  # past the container's usable end
    ([[0, B, 1, 0], [B, B, 1, 0]], "fit"),  # the same storage twice
    ([["0", B, 1, 0]], "bad map piece"),
    ([[0, True, 1, 0]], "bad map piece"),
    ("x", "must be a list"),
])
def test_disk_create_rejects_bad_pieces(pieces, why):
    s = two_containers()
    size = B + 200 if why == "short piece" else B
    if why == "fit" and len(pieces) == 2:
        size = 2 * B
    s.apply(disk_rec("other", 4 * B, [[0, 4 * B, 1, 8 * B]], thick=True))
    before = copy.deepcopy(image(s))
    with pytest.raises(StateError, match=why):
        s.apply_wire(wire_disk_rec("d", size, pieces))
    assert image(s) == before, "a refused record changed the table"
    assert check(s) == []


@pytest.mark.parametrize("rec", [
    DiskMap("d", [(2 * B, B, 1, 40 * B), (0, B, 1, 0)]),
    DiskMap("d", [(4 * B, B, 1, 40 * B), (5 * B, B, 1, 40 * B)]),
    DiskMap("d", [(4 * B, 2 * B, 1, 40 * B), (5 * B, B, 2, 0)]),
    DiskMap("d", [(-B, B, 1, 40 * B)]),
    DiskResize("d", 100 * B, [(8 * B, 90 * B, 1, 0)]),
    DiskResize("d", 100 * B, [(8 * B, B, 2, 0), (9 * B, B, 99, 0)]),
    DiskResize("d", 2 * B, [(B, B, 2, 0)]),
    DiskUnmap("d", 0, 3 * B - 1),
])
def test_refused_records_change_nothing(rec):
    """A record refused live is not journaled, so it must leave no trace in the table."""
    s = two_containers()
    s.apply(disk_rec("d", 8 * B, [[0, 3 * B, 1, 0]]))
    before = copy.deepcopy(image(s))
    with pytest.raises(StateError):
        s.apply(rec)
    assert image(s) == before
    assert check(s) == []


def test_disk_map_unmap_and_rm_free_space():
    s = two_containers()
    s.apply(disk_rec("thin", 40 * B + 5))
    assert s.disks["thin"].allocated == 0 and check(s) == []
    s.apply(DiskMap("thin", [(8 * B, 4 * B, 1, 0)]))
    s.apply(DiskMap("thin", [(40 * B, 5, 2, 0)]))  # short tail
    assert s.disks["thin"].allocated == 4 * B + 5
    assert (s.containers["c1"].used, s.containers["c2"].used) == (4 * B, B)
    with pytest.raises(StateError):  # already mapped
        s.apply(DiskMap("thin", [(8 * B, B, 1, 20 * B)]))
    assert check(s) == []
    s.apply(DiskUnmap("thin", 9 * B, 11 * B))
    assert s.disks["thin"].allocated == 2 * B + 5 and s.containers["c1"].used == 2 * B
    assert check(s) == []
    with pytest.raises(StateError):
        s.apply(DiskUnmap("thin", 0, 41 * B))
    with pytest.raises(StateError):
        s.apply(DiskUnmap("thin", 100, B))
    s.apply(DiskRm("thin"))
    assert not s.disks and s.containers["c1"].used == 0 and s.containers["c2"].used == 0
    assert check(s) == []
    with pytest.raises(StateError, match="no such disk"):
        s.apply(DiskMap("thin", []))


def test_disk_unmap_refuses_unaligned_end_inside_the_disk():
    """Freeing a partial block would hand out storage the rest of the block still uses."""
    s = two_containers()
    s.apply(disk_rec("d", 8 * B, plan(s, 8 * B, 0, 1), thick=True))
    before = copy.deepcopy(image(s))
    with pytest.raises(StateError):
        s.apply(DiskUnmap("d", 0, B + 100))
    assert image(s) == before
    assert check(s) == []


def test_disk_resize_grow_and_shrink():
    s = two_containers()
    s.apply(disk_rec("d", 12345, plan(s, 12345, 0, 1), thick=True))
    # grow thick: the short tail grows to its full block, new space mapped after it
    s.apply(DiskResize("d", 20000, [tuple(p) for p in plan(s, 20000 - 4 * B, 4 * B, 1)]))
    assert s.disks["d"].allocated == 20000 and s.disks["d"].size == 20000
    assert s.containers["c1"].used == 5 * B and check(s) == []
    s.apply(DiskResize("d", 3 * B + 1, []))
    assert s.disks["d"].allocated == 3 * B + 1 and s.containers["c1"].used == 4 * B
    assert check(s) == []
    s.apply(DiskResize("d", 3 * B, []))
    assert s.containers["c1"].used == 3 * B and check(s) == []
    s.apply(DiskResize("d", 0, []))
    assert s.disks["d"].allocated == 0 and s.containers["c1"].used == 0 and check(s) == []
    # grow a thin disk: nothing allocated
    s.apply(DiskResize("d", 1 << 40, []))
    assert s.disks["d"].allocated == 0
    with pytest.raises(StateError):
        s.apply_wire({"op": "disk.resize", "name": "d", "size": -1, "map": []})
    with pytest.raises(StateError):
        s.apply(DiskResize("nope", 1, []))


def test_disk_rename():
    s = two_containers()
    s.apply(disk_rec("a", B, plan(s, B, 0, 1), thick=True))
    s.apply(disk_rec("b", B))
    epoch = s.disks["a"].epoch
    s.apply(DiskRename("a", "z"))
    assert sorted(s.disks) == ["b", "z"] and s.disks["z"].name == "z"
    assert s.disks["z"].epoch > epoch and s.disks["z"].allocated == B
    with pytest.raises(StateError):
        s.apply(DiskRename("z", "b"))
    with pytest.raises(StateError):
        s.apply_wire({"op": "disk.rename", "name": "z", "new": 5})
    assert check(s) == []


@pytest.mark.parametrize("rec", [
    {}, {"op": 5}, {"op": "disk.format", "name": "d"},
    {"op": "disk.create", "name": "d"},  # fields missing
    {"op": "container.add", "name": "c"},
    {"op": "disk.rm"},
])
def test_apply_rejects_malformed_records(rec):
    with pytest.raises(StateError):
        two_containers().apply_wire(rec)


def test_apply_tracks_seq_and_wire_roundtrip():
    s = two_containers()
    s.apply(disk_rec("d", 9 * B + 3, plan(s, 9 * B + 3, 0, 2), thick=True), 7)
    assert s.seq == 7
    w = format1(s)
    t = from_format1(copy.deepcopy(w))
    assert format1(t) == w and image(t) == image(s) and check(t) == []
    with pytest.raises(StateError):
        from_format1({**w, "format": 99})
    with pytest.raises(StateError):
        from_format1({k: v for k, v in w.items() if k != "disks"})


# ---------------------------------------------------------------- random sequences


NAMES = ["d0", "d1", "d2", "d3"]


class StateMachine(RuleBasedStateMachine):
    """Random records through apply(); a per-block model, check() and replay as oracles."""

    def __init__(self) -> None:
        super().__init__()
        self.s = State()
        self.records: list[Record] = []
        for rec in (ContainerAdd("c1", 1, "/x1", 48 * B + 100, True),
                    ContainerAdd("c2", 2, "/x2", 24 * B, False)):
            self.apply(rec)
        self.model: dict[str, dict[int, tuple[int, int]]] = {}  # disk -> block -> (lun, off)

    def apply(self, rec: Record) -> None:
        self.s.apply(rec, len(self.records) + 1)
        self.records.append(rec)

    def free(self) -> int:
        return sum(c.space.free for c in self.s.containers.values())

    def _take(self, name: str, pieces: list[list[int]]) -> None:
        for vstart, n, lun, off in pieces:
            for k in range(0, round_up(n), B):
                self.model[name][(vstart + k) // B] = (lun, off + k)

    @precondition(lambda self: len(self.s.disks) < len(NAMES))
    @rule(size=st.integers(0, 30 * B), thick=st.booleans(), odd=st.booleans())
    def create(self, size: int, thick: bool, odd: bool) -> None:
        name = next(n for n in NAMES if n not in self.s.disks)
        size = size if odd else round_up(size)
        pieces: list[list[int]] = []
        if thick:
            if round_up(size) > self.free():
                return
            pieces = plan(self.s, size, 0, 1)
        self.model[name] = {}
        self.apply(disk_rec(name, size, pieces, thick=thick))
        self._take(name, pieces)

    @precondition(lambda self: self.s.disks)
    @rule(data=st.data(), seg=st.integers(0, 8), lun=st.sampled_from([1, 2]))
    def map_segment(self, data: st.DataObject, seg: int, lun: int) -> None:
        name = data.draw(st.sampled_from(sorted(self.s.disks)))
        d = self.s.disks[name]
        vstart = seg * 4 * B
        if vstart >= d.size:
            return
        length = min(4 * B, d.size - vstart)
        if next(d.extents.stored_in(vstart, vstart + length), None) is not None:
            return
        c = self.s.luns[lun]
        where = c.space.find_contiguous(round_up(length))
        if where is None:
            return
        pieces = [[vstart, length, lun, where]]
        self.apply(DiskMap(name, [tuple(p) for p in pieces]))
        self._take(name, pieces)

    @precondition(lambda self: self.s.disks)
    @rule(data=st.data(), size=st.integers(0, 40 * B), odd=st.booleans())
    def resize(self, data: st.DataObject, size: int, odd: bool) -> None:
        name = data.draw(st.sampled_from(sorted(self.s.disks)))
        d = self.s.disks[name]
        size = size if odd else round_up(size)
        pieces: list[list[int]] = []
        if size > d.size and d.thick:
            start = round_up(d.size)
            if size > start:
                if round_up(size - start) > self.free():
                    return
                pieces = plan(self.s, size - start, start, d.home)
        keep = -(-size // B)
        self.model[name] = {b: v for b, v in self.model[name].items() if b < keep}
        self.apply(DiskResize(name, size, [tuple(p) for p in pieces]))
        self._take(name, pieces)

    @precondition(lambda self: self.s.disks)
    @rule(data=st.data(), a=st.integers(0, 40), n=st.integers(0, 40), to_end=st.booleans())
    def unmap(self, data: st.DataObject, a: int, n: int, to_end: bool) -> None:
        name = data.draw(st.sampled_from(sorted(self.s.disks)))
        d = self.s.disks[name]
        start = min(a * B, round_up(d.size) // B * B)
        if start > d.size:
            return
        end = d.size if to_end else min(start + n * B, d.size)
        self.apply(DiskUnmap(name, start, end))
        gone = range(start // B, -(-end // B))
        self.model[name] = {b: v for b, v in self.model[name].items() if b not in gone}

    @precondition(lambda self: self.s.disks)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.s.disks)))
        self.apply(DiskRm(name))
        del self.model[name]

    @precondition(lambda self: self.s.disks and len(self.s.disks) < len(NAMES))
    @rule(data=st.data())
    def rename(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.s.disks)))
        new = next(n for n in NAMES if n not in self.s.disks)
        self.apply(DiskRename(name, new))
        self.model[new] = self.model.pop(name)

    @invariant()
    def table_is_consistent(self) -> None:
        assert check(self.s) == []
        used = {lun: 0 for lun in self.s.luns}
        for name, d in self.s.disks.items():
            got: dict[int, tuple[int, int]] = {}
            for e in d.extents:
                assert e.vend <= d.size
                for k in range(0, e.length, B):
                    got[(e.vstart + k) // B] = (e.lun, e.offset + k)
                used[e.lun] += round_up(e.length)
            assert got == self.model[name], f"disk {name} moved or lost data"
            want = sum(min(B, d.size - b * B) for b in got)
            assert d.allocated == want
        for lun, c in self.s.luns.items():
            assert c.used == used[lun]

    @invariant()
    def replay_matches_live(self) -> None:
        w = image(self.s)
        assert image(from_format1(copy.deepcopy(format1(self.s)))) == w
        snap = Snapshot(self.s)  # the checkpoint's parts, cut small
        parts = list(snap.parts(64))
        snap.release()
        assert image(from_parts(parts)) == w
        again = State()  # replay: the records as the journal holds them
        for k, rec in enumerate(self.records, 1):
            again.apply_wire({**copy.deepcopy(rec.to_wire()), "seq": k})
        assert image(again) == w


StateMachine.TestCase.settings = settings(
    max_examples=120, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestStateRandom = StateMachine.TestCase


# ---------------------------------------------------------------- check() on corrupted tables


@pytest.fixture
def healthy() -> State:
    s = two_containers()
    s.apply(disk_rec("a", 8 * B, [[0, 8 * B, 1, 0]], thick=True))
    s.apply(disk_rec("b", 4 * B + 10, [[0, 4 * B + 10, 1, 8 * B]], thick=True))
    s.apply(disk_rec("t", 100 * B))
    s.apply(DiskMap("t", [(12 * B, 4 * B, 2, 0)]))
    assert check(s) == []
    return s


def _one(s: State, level: str, text: str) -> None:
    probs = check(s)
    assert any(p.level == level and text in p.message for p in probs), probs


def test_check_overlap(healthy):
    d = healthy.disks["t"]
    healthy.containers["c2"].space.take(4 * B, B)
    d.extents._insert_raw(d.extents.find(12 * B)._replace(vstart=13 * B, offset=4 * B,
                                                          length=B))
    _one(healthy, "error", "overlaps the previous extent")


def test_check_extent_past_disk_end(healthy):
    healthy.disks["a"].size = 6 * B
    _one(healthy, "error", "runs past the disk's end")


def test_check_extent_past_container_end(healthy):
    d = healthy.disks["t"]
    d.extents.insert(40 * B, B, 2, 32 * B)  # c2 is 32 blocks
    _one(healthy, "error", "runs past the end of container 'c2'")


def test_check_unaligned_extent(healthy):
    d = healthy.disks["t"]
    healthy.containers["c2"].space.take(8 * B, B)
    d.extents.insert(50 * B, 100, 2, 8 * B)
    _one(healthy, "error", "not block-aligned")


def test_check_unknown_lun(healthy):
    healthy.disks["t"].extents.insert(60 * B, B, 9, 0)
    _one(healthy, "error", "unknown LUN 9")


def test_check_used_but_free(healthy):
    healthy.containers["c1"].space.release(0, B)  # disk a's first block marked free
    _one(healthy, "error", "in use but marked free")


def test_check_shared_storage(healthy):
    healthy.disks["t"].extents.insert(70 * B, B, 1, 2 * B)  # disk a's third block
    _one(healthy, "error", "share storage")


def _moving(s: State) -> None:
    """Disk t's segment at 12 blocks starts moving to c1 at block 20."""
    s.apply(MoveStart("t", 12 * B, 4 * B, 1, 20 * B))
    assert check(s) == []


def test_check_bitmap_size_mismatch(healthy):
    _moving(healthy)
    healthy.disks["t"].alts[12 * B].bitmap = Bitmap(3)
    _one(healthy, "error", "bitmap at 49152 has 3 blocks")


def test_check_alternate_without_segment(healthy):
    _moving(healthy)
    d = healthy.disks["t"]
    d.alts[40 * B] = d.alts.pop(12 * B)
    _one(healthy, "error", "has no moving segment")
    _one(healthy, "error", "is moving but has no alternate location")


def test_check_alternate_unknown_lun(healthy):
    _moving(healthy)
    healthy.disks["t"].alts[12 * B].lun = 9
    _one(healthy, "error", "unknown LUN 9")


def test_check_alternate_marked_free(healthy):
    _moving(healthy)
    healthy.containers["c1"].space.release(20 * B, 4 * B)
    _one(healthy, "error", "in use but marked free")


def test_check_leak_is_not_an_error(healthy):
    healthy.containers["c1"].space.take(30 * B, 2 * B)
    probs = check(healthy)
    assert probs == [Problem("leak", "container 'c1': 8K (8192 bytes) is neither free nor "
                                     "used by any disk")]


def test_check_free_list_larger_than_container(healthy):
    c = healthy.containers["c2"]
    c.space = FreeSpace(64 * B)  # claims more free space than the container holds
    assert errors(healthy)


# ---------------------------------------------------------------- controller.boot (issue 6 C)


def test_boot_counter_apply_and_refusals():
    s = State()
    assert s.boot == 0
    s.apply(ControllerBoot(1), 1)
    s.apply_wire({"op": "controller.boot", "boot": 2, "seq": 2})
    assert (s.boot, s.seq) == (2, 2)
    for bad in (2, 4, 0, -1):
        with pytest.raises(StateError):
            s.apply(ControllerBoot(bad))
        assert s.boot == 2 and s.seq == 2
    for bad in (2, 4, 0, -1, True, "3", 3.0, None):
        with pytest.raises(StateError):
            s.apply_wire({"op": "controller.boot", "boot": bad})
        assert s.boot == 2 and s.seq == 2
    with pytest.raises(StateError):
        s.apply_wire({"op": "controller.boot"})


def test_boot_counter_replays_and_round_trips():
    recs = [{"op": "controller.boot", "boot": 1, "seq": 1}]
    s = two_containers()
    s.apply(ControllerBoot(1), 1)
    again = State()
    again.apply_wire(copy.deepcopy(recs[0]))
    assert again.boot == 1
    w = format1(s)
    assert w["boot"] == 1 and from_format1(copy.deepcopy(w)).boot == 1
    old = {k: v for k, v in w.items() if k != "boot"}  # a format-1 checkpoint from before
    assert from_format1(old).boot == 0
    with pytest.raises(StateError):
        from_format1({**w, "boot": "1"})
    snap = Snapshot(s)
    parts = list(snap.parts())
    snap.release()
    assert parts[0]["boot"] == 1
    assert image(from_parts(parts)) == image(s)
