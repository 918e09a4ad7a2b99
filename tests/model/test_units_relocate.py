"""storage.relocate: shared storage moves whole, every table of the family that maps it
is switched in one record, replay gives the same state (controller/state_relocate.py,
controller/jobplan.py)."""

from __future__ import annotations

import pytest
from stateimage import image

from controller.consistency import check
from controller.jobplan import RELOCATE_CHUNK, plan_drain, plan_migrate
from controller.protocol import BLOCK_SIZE
from controller.records import (
    ContainerAdd,
    DiskClone,
    DiskCreate,
    DiskMap,
    DiskUnmap,
    MoveStart,
    Record,
    SnapCreate,
    StorageRelocate,
    decode,
)
from controller.state import State
from controller.tables import StateError

B = BLOCK_SIZE
M = 1 << 20


def cow(s: State, recs: list[Record], name: str, vstart: int, length: int, lun: int,
        off: int) -> None:
    """Give table name own storage at [vstart, +length) (lun, off), as a committed
    copy-on-write leaves it (unmap + map)."""
    for r in (DiskUnmap(name, vstart, vstart + length),
              DiskMap(name, [(vstart, length, lun, off)])):
        s.apply(r)
        recs.append(r)


@pytest.fixture
def fam() -> tuple[State, list[Record]]:
    s = State()
    recs: list[Record] = [
        ContainerAdd("c1", 1, "/x/c1", 64 * M, True),
        ContainerAdd("c2", 2, "/x/c2", 64 * M, True),
        ContainerAdd("c3", 3, "/x/c3", 64 * M, True),
        DiskCreate("d", 8 * M, 4 * M, False, None, 1, 1.0, [(0, 8 * M, 1, 0)]),
        SnapCreate("d", "s", 2.0),
        DiskClone("d@s", "k", 3.0),
    ]
    for r in recs:
        s.apply(r)
    cow(s, recs, "d", 0, M, 1, 8 * M)  # d's own first MiB, on c1
    cow(s, recs, "k", 4 * M, M, 2, 0)  # k's own [4M, 5M), on c2
    return s, recs


def replayed(recs: list[Record]) -> State:
    s = State()
    for r in recs:
        s.apply_wire(r.to_wire())  # the wire form, as the journal replays it
    return s


def errors(s: State) -> list[str]:
    return [p.message for p in check(s) if p.level == "error"]


def test_plan_counts_live_and_shared_once(fam):
    s, _ = fam
    p = plan_drain(s, 1)
    # d: its own first MiB is live; everything else d maps on c1 is shared with d@s
    assert p.live == {"d": M}
    # d@s's 8 MiB on c1 (d, d@s and k share parts of it): counted once, under d
    assert p.shared_bytes == 8 * M and p.total == 9 * M
    assert all(u.length <= RELOCATE_CHUNK and u.lun == 1 for u in p.units)
    assert plan_drain(s, 2).live == {"k": M} and plan_drain(s, 2).shared_bytes == 0
    m = plan_migrate(s, "d", 3)
    assert m.live == {"d": M} and m.shared_bytes == 8 * M


def test_relocate_switches_every_table_and_replays(fam):
    s, recs = fam
    before = s.luns[1].used, s.luns[3].used
    for u in plan_drain(s, 1).units:
        r = StorageRelocate(u.family, u.vstart, u.length, u.lun, u.offset, 3,
                            s.luns[3].space.plan(u.length)[0][0])
        s.apply(r)
        recs.append(r)
    assert not errors(s)
    for t in (s.snaps["d@s"], s.disks["k"]):
        assert {e.lun for e in t.extents} <= {2, 3}, t.name
    assert {e.lun for e in s.disks["d"].extents} == {1, 3}  # its own MiB stays (live)
    assert s.luns[1].used == before[0] - 8 * M and s.luns[3].used == before[1] + 8 * M
    assert image(replayed(recs)) == image(s)
    assert plan_drain(s, 1).shared_bytes == 0 and plan_drain(s, 1).live == {"d": M}


def test_relocate_keeps_sharing_at_the_same_vstart(fam):
    s, _ = fam
    s.apply(StorageRelocate(1, 2 * M, 2 * M, 1, 2 * M, 2, 32 * M))
    rows = {t.name: [(e.vstart, e.length, e.lun, e.offset) for e in t.extents.stored_in(
        2 * M, 4 * M)] for t in (s.disks["d"], s.snaps["d@s"], s.disks["k"])}
    assert rows["d"] == rows["d@s"] == rows["k"] == [(2 * M, 2 * M, 2, 32 * M)]
    assert not errors(s)


@pytest.mark.parametrize("rec, why", [
    (StorageRelocate(1, 0, 3000, 1, 0, 3, 0), "whole blocks"),
    (StorageRelocate(1, 0, B, 9, 0, 3, 0), "unknown LUN"),
    (StorageRelocate(1, 2 * M, B, 1, 2 * M, 1, 0), "is not free"),  # c1:0 is d@s's
    (StorageRelocate(1, 2 * M, B, 1, 40 * M, 3, 0), "not wholly allocated"),
    (StorageRelocate(1, 2 * M, B, 2, 2 * M, 3, 0), "not wholly allocated"),
    (StorageRelocate(7, 2 * M, B, 1, 2 * M, 3, 0), "maps"),
])
def test_refused_relocations_change_nothing(fam, rec, why):
    s, _ = fam
    was = image(s)
    with pytest.raises(StateError, match=why):
        s.apply(rec)
    assert image(s) == was
    assert decode(rec.to_wire()) == rec


def test_relocate_refuses_a_moving_segment(fam):
    s, _ = fam
    s.apply(MoveStart("k", 2 * M, M, 3, 0))  # k copies-on-write [2M, 3M)
    was = image(s)
    with pytest.raises(StateError, match="moving"):
        s.apply(StorageRelocate(1, 2 * M, M, 1, 2 * M, 2, 32 * M))
    assert image(s) == was
