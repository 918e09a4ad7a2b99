"""controller/diff.py: changed ranges from the tables, against per-block oracles.

Two oracles: the mapping itself (a block is unchanged iff both tables map it to
the same storage, or neither maps it), and a content model driven through
State.apply (every write puts a fresh token in its blocks, as copy-on-write
gives new storage): every block whose content differs must be in a change.
"""

from __future__ import annotations

import random

import pytest
from test_units_state import add_container, disk_rec, plan

from controller import diff as D
from controller.extents import MOVING, ExtentMap
from controller.protocol import BLOCK_SIZE
from controller.records import DiskMap, DiskResize, DiskUnmap, SnapCreate, SnapRollback
from controller.state import State

B = BLOCK_SIZE


def per_block(m: ExtentMap, nblocks: int) -> list[tuple[int, int, bool] | None]:
    """What each block maps: (lun, offset - vstart, moving), or None."""
    out: list[tuple[int, int, bool] | None] = [None] * nblocks
    for e in m:
        for b in range(e.vstart // B, min(-(-e.vend // B), nblocks)):
            out[b] = (e.lun, e.offset - e.vstart, bool(e.flags & MOVING))
    return out


def expected(old: ExtentMap, new: ExtentMap, size: int) -> list[tuple[int, bool]]:
    """(block, data) of every block whose storage differs, by the per-block oracle."""
    n = -(-size // B)
    a, b = per_block(old, n), per_block(new, n)
    out = []
    for i in range(n):
        same = a[i] == b[i] and (a[i] is None or not a[i][2])  # type: ignore[index]
        if not same:
            out.append((i, b[i] is not None))
    return out


def blocks_of(chs: list[D.Change]) -> list[tuple[int, bool]]:
    out = []
    for c in chs:
        assert c.offset % B == 0 and c.length > 0
        out += [(i, c.data) for i in range(c.offset // B, -(-c.end // B))]
    return out


def random_map(rng: random.Random, nblocks: int, luns: int = 2,
               moving: bool = False) -> ExtentMap:
    m = ExtentMap()
    pos = rng.randrange(0, 3)
    while pos < nblocks:
        n = rng.randrange(1, 6)
        n = min(n, nblocks - pos)
        flags = MOVING if moving and rng.random() < 0.1 else 0
        m.insert(pos * B, n * B, rng.randrange(1, luns + 1), rng.randrange(0, 8) * B, flags)
        pos += n + rng.randrange(0, 3)
    return m


def mutate(rng: random.Random, m: ExtentMap, nblocks: int) -> ExtentMap:
    """A copy of m with some ranges unmapped and some remapped elsewhere."""
    out = m.clone()
    for _ in range(rng.randrange(0, 6)):
        lo = rng.randrange(0, nblocks)
        hi = min(nblocks, lo + rng.randrange(1, 8))
        out.remove_range(lo * B, hi * B)
        if rng.random() < 0.6:
            out.insert(lo * B, (hi - lo) * B, rng.randrange(1, 3), rng.randrange(100, 200) * B)
    return out


@pytest.mark.parametrize("seed", range(300))
def test_changes_match_the_per_block_oracle(seed):
    rng = random.Random(seed)
    n = rng.randrange(1, 60)
    moving = rng.random() < 0.3  # segments being moved: never the same storage
    old = random_map(rng, n, moving=moving)
    new = mutate(rng, old, n) if rng.random() < 0.8 else random_map(rng, n, moving=moving)
    size = n * B
    chs, nxt = D.changes(old, new, 0, size)
    assert nxt is None
    assert blocks_of(chs) == expected(old, new, size)
    for x, y in zip(chs, chs[1:], strict=False):  # merged: no two touching of one kind
        assert x.end < y.offset or x.data != y.data
    # paged: the pages put together give the same answer
    limit = rng.randrange(1, 4)
    got, start = [], 0
    while True:
        page, nxt = D.changes(old.stored_in(start, size), new.stored_in(start, size), start,
                              size, limit)
        assert len(page) <= limit
        got += page
        if nxt is None:
            break
        assert nxt > start
        start = nxt
    assert blocks_of(got) == blocks_of(chs)
    # the column walk (the controller's) answers the same, whole and in windows
    assert D.changes_cols(old.columns(0, size), new.columns(0, size), 0, size) == (chs, None)
    cut = rng.randrange(0, size + 1)
    halves = [D.changes_cols(old.columns(a, b), new.columns(a, b), a, b)[0]
              for a, b in ((0, cut), (cut, size))]
    assert list(D.join(halves[0] + halves[1])) == chs
    got, start = [], 0
    while True:
        page, nxt = D.changes_cols(old.columns(start, size), new.columns(start, size), start,
                                   size, limit)
        got += page
        if nxt is None:
            break
        start = nxt
    assert got == chs


def test_identical_and_empty():
    m = ExtentMap()
    m.insert(0, 8 * B, 1, 0)
    m.insert(16 * B, 8 * B, 1, 64 * B)
    assert D.changes(m, m.clone(), 0, 32 * B) == ([], None)
    assert D.changes(ExtentMap(), ExtentMap(), 0, 32 * B) == ([], None)
    # all of a new table against an empty one is data; unmapping all of it is zero
    assert D.changes(ExtentMap(), m, 0, 32 * B)[0] == [D.Change(0, 8 * B, True),
                                                     D.Change(16 * B, 8 * B, True)]
    assert D.changes(m, ExtentMap(), 0, 32 * B)[0] == [D.Change(0, 8 * B, False),
                                                     D.Change(16 * B, 8 * B, False)]
    # the same container, the same vstart, another offset: changed
    other = ExtentMap()
    other.insert(0, 8 * B, 1, 4 * B)
    assert D.changes(m, other, 0, 8 * B)[0] == [D.Change(0, 8 * B, True)]
    # FROM's extents past TO's end are not compared (TO is shorter)
    assert D.changes(m, ExtentMap(), 0, 4 * B)[0] == [D.Change(0, 4 * B, False)]


def test_full_states_gaps_as_zero():
    m = ExtentMap()
    m.insert(4 * B, 4 * B, 1, 0)
    m.insert(8 * B, 4 * B, 2, 0)  # touching, another container: merged as one data range
    whole = [D.Change(0, 4 * B, False), D.Change(4 * B, 8 * B, True),
             D.Change(12 * B, 4 * B + 5, False)]
    assert D.full(m, 0, 16 * B + 5) == (whole, None)
    assert D.full(ExtentMap(), 0, 10) == ([D.Change(0, 10, False)], None)
    assert D.changed_bytes(D.full(m, 0, 16 * B)[0]) == (8 * B, 8 * B)
    for limit in (1, 2):  # paged
        got, start = [], 0
        while start is not None:
            page, start = D.full(m.stored_in(start, 16 * B + 5), start or 0, 16 * B + 5, limit)
            assert 0 < len(page) <= limit
            got += page
        assert list(D.join(got)) == whole
    assert D.Change(0, 5, False).to_dict() == {"offset": 0, "length": 5, "exists": False,
                                               "type": "zero"}


@pytest.mark.parametrize("seed", range(60))
def test_no_changed_block_is_missed_through_state(seed):
    """Writes as the service makes them (a write to shared storage gets new storage:
    unmap, then map new space), discards, resizes and rollbacks, through State.apply;
    a content model with a fresh token per write. Every block whose content differs
    between a snapshot and a later snapshot (or the disk) is in a change of the right
    kind, and no change covers a block both map to the same storage."""
    rng = random.Random(seed)
    s = State()
    add_container(s, "c1", 1, 4096 * B)
    add_container(s, "c2", 2, 4096 * B)
    size = rng.randrange(8, 64) * B
    s.apply(disk_rec("d", size))
    content: dict[str, dict[int, int]] = {"d": {}}
    token = 0
    snaps: list[str] = []
    for step in range(rng.randrange(5, 30)):
        d = s.disks["d"]
        nb = d.size // B
        r = rng.random()
        if r < 0.5 and nb:
            lo = rng.randrange(0, nb)
            hi = min(nb, lo + rng.randrange(1, 6))
            s.apply(DiskUnmap("d", lo * B, hi * B))
            s.apply(DiskMap("d", [tuple(p) for p in plan(s, (hi - lo) * B, lo * B)]))
            token += 1
            for b in range(lo, hi):
                content["d"][b] = token
        elif r < 0.65 and nb:
            lo = rng.randrange(0, nb)
            hi = min(nb, lo + rng.randrange(1, 6))
            s.apply(DiskUnmap("d", lo * B, hi * B))
            for b in range(lo, hi):
                content["d"].pop(b, None)
        elif r < 0.75:
            new = rng.randrange(4, 64) * B
            if new < d.size:
                s.apply(DiskResize("d", new, []))
                content["d"] = {b: t for b, t in content["d"].items() if b < new // B}
            else:
                s.apply(DiskResize("d", new, []))
        elif r < 0.8 and snaps:
            full = rng.choice(snaps)
            s.apply(SnapRollback(full))
            content["d"] = dict(content[full])
        else:
            name = f"s{step}"
            s.apply(SnapCreate("d", name, float(step)))
            snaps.append(f"d@{name}")
            content[f"d@{name}"] = dict(content["d"])
    tables = [*snaps, "d"]
    for i, a in enumerate(tables):
        for b in tables[i + 1:]:
            ta, tb = s.table(a), s.table(b)
            chs, _ = D.changes(ta.extents, tb.extents, 0, tb.size)
            assert D.changes_cols(ta.extents.columns(0, tb.size), tb.extents.columns(
                0, tb.size), 0, tb.size) == (chs, None)
            got = dict(blocks_of(chs))
            nb = -(-tb.size // B)
            for blk in range(nb):
                ca, cb = content[a].get(blk), content[b].get(blk)
                if ca != cb:
                    assert blk in got, (a, b, blk)
                    assert got[blk] == (cb is not None), (a, b, blk)
            assert sorted(got.items()) == expected(ta.extents, tb.extents, tb.size)
