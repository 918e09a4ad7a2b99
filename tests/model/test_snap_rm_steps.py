"""snap rm's plan and apply skip what a snapshot still shares chunk by chunk
(ExtentMap.batches, sharing.own_pieces; docs/snapshots.md): the storage they free
must be exactly what the per-extent walk over the whole table frees."""

from __future__ import annotations

import random
import time

import pytest

from controller import sharing
from controller.records import (
    ContainerAdd,
    DiskClone,
    DiskCreate,
    DiskMap,
    DiskUnmap,
    SnapCreate,
    SnapRm,
    SnapRollback,
    SnapTrim,
)
from controller.state import State, StateError

SEG = 4096


def _freed(state: State, name: str, pieces: list) -> list[tuple[int, int, int]]:
    s = state.snaps[name]
    others = [t for t in state.family(s.family) if t is not s]
    refs = sharing.referenced_all(others, pieces)
    return sorted((e.lun, off, n) for e, r in zip(pieces, refs, strict=True)
                  for off, n in sharing.unshared_blocks(e, r))


def _state(seed: int, nseg: int = 3000) -> tuple[State, random.Random, int]:
    rnd = random.Random(seed)
    state = State()
    state.apply(ContainerAdd("c0", 1, "/nonexistent/c0", 64 * nseg * SEG, True), 1)
    state.apply(DiskCreate("d", nseg * SEG, SEG, False, None, 1, time.time(), []), 2)
    seq = 2
    order = list(range(nseg))
    rnd.shuffle(order)  # nothing merges: one extent a segment
    for i in order:
        seq += 1
        vs, pieces = i * SEG, []
        for off, n in state.luns[1].space.plan(SEG):
            pieces.append((vs, n, 1, off))
            vs += n
        state.apply(DiskMap("d", pieces), seq)
    return state, rnd, seq


def _diverge(seed: int) -> tuple[State, random.Random, int]:
    """_state's disk "d" and a snapshot d@s of it, then the disk changed: the first
    third unmapped here and there, the second remapped elsewhere here and there (same
    extents but for the offset), chunks of the last third copied unchanged (as a
    mutation copies them). The snapshot shares some chunks whole, some in part."""
    state, rnd, seq = _state(seed)
    seq += 1
    state.apply(SnapCreate("d", "s", 1.0), seq)
    d = state.disks["d"]
    third = d.size // SEG // 3
    for _ in range(40):
        i = rnd.randrange(third)
        seq += 1
        state.apply(DiskUnmap("d", i * SEG, (i + rnd.randrange(1, 4)) * SEG), seq)
    for _ in range(40):
        i = third + rnd.randrange(third)
        seq += 1
        state.apply(DiskUnmap("d", i * SEG, (i + 1) * SEG), seq)
        (off, n), = state.luns[1].space.plan(SEG)
        seq += 1
        state.apply(DiskMap("d", [(i * SEG, n, 1, off)]), seq)
    for ci in range(0, len(d.extents._chunks)):
        if d.extents._chunks[ci].vs[0] >= 2 * third * SEG:
            d.extents._own(ci)
    return state, rnd, seq


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("step", [1, 700, 5000])
def test_snap_rm_in_trim_steps_frees_what_one_rm_frees(seed: int, step: int,
                                                       tmp_path) -> None:
    """snap rm's steps (snap.trim over ExtentMap.own_spans, then snap.rm) leave the
    free lists exactly as one snap.rm does; each step holds at most about step
    extents (whole chunks); from the first step on the snapshot is marked removing,
    through a checkpoint too, and clones of it and rollbacks to it are refused."""
    from controller.checkpoint import load_checkpoint, write_checkpoint

    one, _rnd, seq = _diverge(seed)
    one.apply(SnapRm("d@s"), seq + 1)
    state, _rnd, seq = _diverge(seed)
    s = state.snaps["d@s"]
    others = [t.extents for t in state.family(s.family) if t is not s]
    spans = s.extents.own_spans(step, others)
    assert spans == sorted(spans) and all(a < b for a, b in spans)
    assert all(b <= c for (_a, b), (c, _d) in zip(spans, spans[1:], strict=False))
    owned = sum(len(s.extents.stored_list(a, b)) for a, b in spans)
    assert owned == len(sharing.own_pieces(s, [state.disks["d"]]))
    for a, b in spans:
        assert len(s.extents.stored_list(a, b)) <= max(step, 1024)
    seq += 1
    state.apply(SnapTrim("d@s", 0, 0), seq)
    assert s.removing and len(s.extents) > owned
    write_checkpoint(str(tmp_path), state)
    back = load_checkpoint(str(tmp_path))
    assert back.snaps["d@s"].removing and not back.disks["d"].removing
    for rec in (DiskClone("d@s", "c", 2.0), SnapRollback("d@s")):
        with pytest.raises(StateError, match="being removed"):
            state.apply(rec, seq + 1)
    for a, b in spans:
        seq += 1
        state.apply(SnapTrim("d@s", a, b), seq)
    assert sharing.own_pieces(s, [state.disks["d"]]) == []  # the rest is shared whole
    seq += 1
    state.apply(SnapRm("d@s"), seq)
    assert "d@s" not in state.snaps
    assert list(state.luns[1].space.ranges()) == list(one.luns[1].space.ranges())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_own_pieces_free_exactly_what_the_whole_walk_frees(seed: int) -> None:
    state, rnd, seq = _state(seed)
    seq += 1
    state.apply(SnapCreate("d", "s", 1.0), seq)
    d, s = state.disks["d"], state.snaps["d@s"]
    assert len(s.extents) > 2000  # several chunks
    # untouched: every chunk is the same object; nothing is the snapshot's own
    assert sharing.own_pieces(s, [d]) == []
    state, rnd, seq = _diverge(seed)
    d, s = state.disks["d"], state.snaps["d@s"]
    own = sharing.own_pieces(s, [d])
    assert 0 < len(own) < len(s.extents)
    expect = _freed(state, "d@s", list(s.extents))
    assert expect and _freed(state, "d@s", own) == expect
    # and the apply frees that much (free space grows by exactly it)
    free0 = state.luns[1].space.free
    seq += 1
    state.apply(SnapRm("d@s"), seq)
    assert state.luns[1].space.free - free0 == sum(n for _l, _o, n in expect)


def test_stored_list_is_stored_in() -> None:
    state, rnd, _seq = _state(4, 1500)
    m = state.disks["d"].extents
    for _ in range(500):
        a = rnd.randrange(-SEG, m.mapped_bytes + 2 * SEG)
        b = a + rnd.randrange(0, 40 * SEG)
        assert m.stored_list(a, b) == list(m.stored_in(a, b)), (a, b)


@pytest.mark.parametrize("seed", range(6))
def test_release_many_is_release_of_each(seed: int) -> None:
    """FreeSpace.release_many (one merge) leaves the free list release() one at a time
    leaves; a range already free or overlapping another raises and changes nothing."""
    from controller.allocator import AllocError, FreeSpace

    rnd = random.Random(seed)
    a, b = FreeSpace(4096 * 5000), FreeSpace(4096 * 5000)
    taken = []
    for sp in (a, b):
        sp.take(0, 4096 * 5000)
    pos = 0
    while pos < 4900:  # disjoint ranges, some touching, in random order
        n = rnd.randrange(1, 6)
        if rnd.random() < 0.7:
            taken.append((pos * 4096, n * 4096))
        pos += n + (rnd.random() < 0.5)
    rnd.shuffle(taken)
    for off, n in taken:
        a.release(off, n)
    b.release_many(taken)
    assert list(a.ranges()) == list(b.ranges()) and a.free == b.free
    before = list(b.ranges())
    with pytest.raises(AllocError):
        b.release_many([(4096 * 4990, 4096), taken[0]])  # one of them is free already
    with pytest.raises(AllocError):
        c = FreeSpace(4096 * 100)
        c.take(0, 4096 * 100)
        c.release_many([(0, 8192), (4096, 4096)])  # overlapping one another
    assert list(b.ranges()) == before


def test_clone_and_rollback_of_a_snapshot_being_removed_are_refused(tmp_path) -> None:
    """While snap rm works (its plan lets the loop go), a clone of the snapshot or a
    rollback to it would share what the removal frees: refused, busy, nothing done."""
    from typing import Any, cast

    import trio

    from controller import protocol as P
    from controller.service import Service

    state, _rnd, seq = _state(5, 64)
    state.apply(SnapCreate("d", "s", 1.0), seq + 1)
    s = state.snaps["d@s"]

    class Journal:
        async def wait_durable(self, seq: int) -> None:
            return None

        async def commit(self, rec: object) -> None:
            raise AssertionError(f"nothing may be recorded: {rec}")

    async def check() -> None:
        svc = Service(state, cast(Any, Journal()), str(tmp_path))
        with svc.ctx.removal(s):
            for call in (svc.snapshots.disk_clone("d@s", "c"),
                         svc.snapshots.snap_rollback("d@s", force=True)):
                with pytest.raises(P.RemoteError, match="being removed") as e:
                    await call
                assert e.value.code == P.E_BUSY
        assert "c" not in state.disks and "d@s" in state.snaps

    trio.run(check)
