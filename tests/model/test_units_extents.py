"""controller/extents.py: the segment map, against a per-byte model."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from controller import extents as X
from controller.extents import (
    ERROR,
    INVALID,
    MAX_EXTENT,
    NO_LUN,
    NOWRITE,
    ZERO,
    Extent,
    ExtentError,
    ExtentMap,
)

SPACE = 96  # virtual "bytes" the machine plays with; small so ranges collide often
FLAGS = st.sampled_from([0, 0, 0, NOWRITE, INVALID, ERROR, NOWRITE | INVALID])
LUNS = st.integers(0, 2)


def _mergeable(a: Extent, b: Extent) -> bool:
    return (a.vend == b.vstart and a.lun == b.lun and a.offset + a.length == b.offset
            and a.flags == b.flags and a.length + b.length <= MAX_EXTENT)


class ExtentMachine(RuleBasedStateMachine):
    """Every operation on ExtentMap mirrored on a list with one slot per byte."""

    chunk = None  # patch extents._CHUNK to exercise chunk splitting and joining

    def __init__(self) -> None:
        super().__init__()
        self._old_chunk = X._CHUNK
        if self.chunk is not None:
            X._CHUNK = self.chunk
        self.m = ExtentMap()
        # model[pos] = (lun, offset of this byte, flags) or None for a gap
        self.model: list[tuple[int, int, int] | None] = [None] * SPACE

    def teardown(self) -> None:
        X._CHUNK = self._old_chunk

    def _boundaries_merged(self, *positions: int) -> None:
        for p in positions:
            if 0 < p < SPACE:
                a, b = self.m.find(p - 1), self.m.find(p)
                if a is not None and b is not None and a != b:
                    assert not _mergeable(a, b), f"mergeable neighbours left at {p}: {a} {b}"

    @rule(vstart=st.integers(0, SPACE - 1), length=st.integers(1, 24), lun=LUNS,
          delta=st.sampled_from([0, 0, 1000, 2000]), flags=FLAGS)
    def insert(self, vstart: int, length: int, lun: int, delta: int, flags: int) -> None:
        length = min(length, SPACE - vstart)
        offset = vstart + delta  # delta 0 on the same LUN makes neighbours contiguous
        if any(self.model[p] is not None for p in range(vstart, vstart + length)):
            with pytest.raises(ExtentError):
                self.m.insert(vstart, length, lun, offset, flags)
            return
        self.m.insert(vstart, length, lun, offset, flags)
        for i in range(length):
            self.model[vstart + i] = (lun, offset + i, flags)
        self._boundaries_merged(vstart, vstart + length)

    @rule(pos=st.integers(0, SPACE))
    def split_at(self, pos: int) -> None:
        before = len(self.m)
        inside = self.m.find(pos)
        self.m.split_at(pos)
        grew = inside is not None and inside.vstart != pos
        assert len(self.m) == before + grew
        if pos < SPACE and self.model[pos] is not None:
            assert self.m.find(pos).vstart == pos

    @rule(start=st.integers(0, SPACE), n=st.integers(0, 40))
    def remove_range(self, start: int, n: int) -> None:
        end = min(SPACE, start + n)
        removed = self.m.remove_range(start, end)
        got = {}
        for e in removed:
            assert start <= e.vstart and e.vend <= end, f"{e} outside {start}..{end}"
            for i in range(e.length):
                assert e.vstart + i not in got
                got[e.vstart + i] = (e.lun, e.offset + i, e.flags)
        want = {p: self.model[p] for p in range(start, end) if self.model[p] is not None}
        assert got == want
        for p in range(start, end):
            self.model[p] = None

    @rule(start=st.integers(0, SPACE), n=st.integers(0, 40), set_bits=FLAGS, clear_bits=FLAGS)
    def set_flags(self, start: int, n: int, set_bits: int, clear_bits: int) -> None:
        end = min(SPACE, start + n)
        self.m.set_flags(start, end, set_bits, clear_bits)
        for p in range(start, end):
            if self.model[p] is not None:
                lun, off, fl = self.model[p]
                self.model[p] = (lun, off, (fl | set_bits) & ~clear_bits)
        # set_flags coalesces what it split: no mergeable neighbours at its edges or inside
        self._boundaries_merged(*range(start, end + 1))

    @rule(bits=st.sampled_from([ZERO, ZERO | NOWRITE]))
    def set_flags_zero_refused(self, bits: int) -> None:
        with pytest.raises(ExtentError):
            self.m.set_flags(0, SPACE, bits)

    @rule(pos=st.integers(0, SPACE - 1))
    def entry_at(self, pos: int) -> None:
        e = self.m.entry_at(pos, SPACE)
        assert e.vstart <= pos < e.vend <= SPACE
        if self.model[pos] is None:
            assert e.flags == ZERO and e.lun == NO_LUN
            # the whole gap: bounded by mapped bytes (or the ends) on both sides
            assert all(self.model[p] is None for p in range(e.vstart, e.vend))
            assert e.vstart == 0 or self.model[e.vstart - 1] is not None
            assert e.vend == SPACE or self.model[e.vend] is not None
        else:
            assert e == self.m.find(pos)
            lun, off, fl = self.model[pos]
            assert (e.lun, e.offset + pos - e.vstart, e.flags) == (lun, off, fl)

    @rule(start=st.integers(0, SPACE), n=st.integers(0, SPACE))
    def entries_window(self, start: int, n: int) -> None:
        end = min(SPACE, start + n)
        self._check_entries(start, end)

    @rule()
    def wire_roundtrip(self) -> None:
        cols = self.m.to_wire()
        again = ExtentMap.from_wire(cols)
        assert list(again) == list(self.m)
        assert again.mapped_bytes == self.m.mapped_bytes and len(again) == len(self.m)
        assert again.to_wire() == cols
        self.m = again  # keep mutating the decoded copy

    @precondition(lambda self: len(self.m) > 0)
    @rule()
    def lookup_each_extent(self) -> None:
        for e in self.m:
            assert self.m.find(e.vstart) == e and self.m.find(e.vend - 1) == e
            assert list(self.m.stored_in(e.vstart, e.vend)) == [e]

    def _check_entries(self, start: int, end: int) -> None:
        pos = start
        for e in self.m.entries(start, end):
            assert e.vstart == pos and e.length > 0
            for i in range(e.length):
                m = self.model[pos + i]
                if e.flags & ZERO:
                    assert m is None
                else:
                    assert m == (e.lun, e.offset + i, e.flags)
            pos = e.vend
        assert pos == end

    @invariant()
    def consistent(self) -> None:
        stored = list(self.m)
        assert len(stored) == len(self.m)
        prev_end = 0
        for e in stored:
            assert e.length > 0 and e.vstart >= prev_end and not e.flags & ZERO
            prev_end = e.vend
        assert self.m.mapped_bytes == sum(e.length for e in stored)
        assert self.m.mapped_bytes == sum(1 for x in self.model if x is not None)
        self._check_entries(0, SPACE)


ExtentMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestExtentMap = ExtentMachine.TestCase


class SmallChunkMachine(ExtentMachine):
    chunk = 2  # so a handful of extents spans many chunks


SmallChunkMachine.TestCase.settings = ExtentMachine.TestCase.settings
TestExtentMapSmallChunks = SmallChunkMachine.TestCase


# ---------------------------------------------------------------- examples


def test_insert_merges_contiguous_neighbours():
    m = ExtentMap()
    m.insert(0, 4096, 1, 0)
    m.insert(8192, 4096, 1, 8192)
    m.insert(4096, 4096, 1, 4096)
    assert list(m) == [Extent(0, 12288, 1, 0, 0)]
    m.insert(12288, 4096, 2, 12288)  # other LUN: no merge
    m.insert(16384, 4096, 2, 0)  # not contiguous on the LUN: no merge
    assert len(m) == 3


def test_merge_respects_max_extent():
    m = ExtentMap()
    m.insert(0, MAX_EXTENT, 1, 0)
    m.insert(MAX_EXTENT, 4096, 1, MAX_EXTENT)
    assert [e.length for e in m] == [MAX_EXTENT, 4096]


@pytest.mark.parametrize("args", [
    (0, 0, 1, 0), (-4096, 4096, 1, 0), (0, 4096, -1, 0), (0, 4096, 1, -1),
])
def test_insert_rejects_bad_extents(args):
    with pytest.raises(ExtentError):
        ExtentMap().insert(*args)


def test_insert_rejects_zero_state_and_overlap():
    m = ExtentMap()
    with pytest.raises(ExtentError):
        m.insert(0, 4096, 1, 0, ZERO)
    m.insert(4096, 4096, 1, 0)
    for vs, n in ((0, 4097), (8191, 1), (4096, 4096), (0, 100000)):
        with pytest.raises(ExtentError):
            m.insert(vs, n, 1, 1 << 20)
    assert list(m) == [Extent(4096, 4096, 1, 0, 0)]


def test_many_extents_across_chunks():
    """Thousands of unmergeable extents (forcing chunk splits), then holes punched."""
    m = ExtentMap()
    n = 5000
    for i in range(n - 1, -1, -1):  # reverse order: every insert lands at the front
        m.insert(i * 10, 5, 1 + i % 2, i * 100)
    assert len(m) == n and m.mapped_bytes == 5 * n
    assert m.find(10 * 2500 + 3) == Extent(25000, 5, 1, 250000, 0)
    assert m.find(10 * 2500 + 7) is None
    removed = m.remove_range(10 * 1000 + 2, 10 * 4000 + 2)
    assert sum(e.length for e in removed) == 3000 * 5
    assert removed[0] == Extent(10002, 3, 1, 100002, 0)
    assert len(removed) == 3001 and removed[-1] == Extent(40000, 2, 1, 400000, 0)
    # extents 0..999, the head of 1000, the tail of 4000, 4001..4999
    assert len(m) == 1000 + 1 + 1 + 999
    again = ExtentMap.from_wire(m.to_wire())
    assert list(again) == list(m)
    gaps = [e for e in m.entries(0, 10 * n) if e.flags & ZERO]
    assert sum(e.length for e in gaps) == 10 * n - m.mapped_bytes


def test_entry_at_empty_map_and_gaps():
    m = ExtentMap()
    assert m.entry_at(0, 100) == Extent(0, 100, NO_LUN, 0, ZERO)
    m.insert(40, 10, 1, 0)
    assert m.entry_at(5, 100) == Extent(0, 40, NO_LUN, 0, ZERO)
    assert m.entry_at(45, 100) == Extent(40, 10, 1, 0, 0)
    assert m.entry_at(99, 100) == Extent(50, 50, NO_LUN, 0, ZERO)


def test_from_wire_rejects_damage():
    m = ExtentMap()
    m.insert(0, 4096, 1, 0)
    m.insert(8192, 4096, 1, 0)
    cols = m.to_wire()
    with pytest.raises(ExtentError):
        ExtentMap.from_wire(cols[:4])
    with pytest.raises(ExtentError):
        ExtentMap.from_wire([cols[0][:-1], *cols[1:]])
    with pytest.raises(ExtentError):
        ExtentMap.from_wire([cols[0], cols[1][:8], *cols[2:]])
    with pytest.raises(ExtentError):
        ExtentMap.from_wire(["x", *cols[1:]])
    # the second extent moved to overlap the first
    from array import array
    vs = array("q", [0, 100])
    with pytest.raises(ExtentError):
        ExtentMap.from_wire([vs.tobytes(), *cols[1:]])
    ln = array("q", [4096, 0])
    with pytest.raises(ExtentError):
        ExtentMap.from_wire([cols[0], ln.tobytes(), *cols[2:]])


def test_empty_ranges_yield_nothing():
    m = ExtentMap()
    m.insert(0, 8192, 1, 0)
    assert list(m.entries(100, 100)) == []
    assert list(m.stored_in(100, 100)) == []
    assert m.remove_range(100, 100) == [] and m.mapped_bytes == 8192
