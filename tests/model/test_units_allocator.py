"""controller/allocator.py and controller/bitmap.py against set models."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from controller.allocator import AllocError, FreeSpace, NoSpace
from controller.bitmap import Bitmap
from controller.protocol import BLOCK_SIZE

NBLOCKS = 48
SIZE = NBLOCKS * BLOCK_SIZE + 1000  # a size that is not a whole number of blocks


class FreeSpaceMachine(RuleBasedStateMachine):
    """take/release/plan at block granularity against a set of free blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.fs = FreeSpace(SIZE)
        self.free = set(range(NBLOCKS))
        self.owned: list[tuple[int, int]] = []  # (offset, length) taken by us

    @rule(b=st.integers(-2, NBLOCKS + 2), n=st.integers(-1, 12))
    def take(self, b: int, n: int) -> None:
        blocks = set(range(b, b + n))
        if n <= 0 or not blocks <= self.free:
            with pytest.raises(AllocError):
                self.fs.take(b * BLOCK_SIZE, n * BLOCK_SIZE)
            return
        self.fs.take(b * BLOCK_SIZE, n * BLOCK_SIZE)
        self.free -= blocks
        self.owned.append((b * BLOCK_SIZE, n * BLOCK_SIZE))

    @rule(b=st.integers(-2, NBLOCKS + 2), n=st.integers(-1, 12))
    def release_arbitrary(self, b: int, n: int) -> None:
        """Releasing anything not wholly in use is refused (double free, past the end)."""
        blocks = set(range(b, b + n))
        inside = b >= 0 and b + n <= NBLOCKS
        if n > 0 and inside and not blocks & self.free:
            self.fs.release(b * BLOCK_SIZE, n * BLOCK_SIZE)
            self.free |= blocks
            self.owned = [o for o in self.owned if not set(
                range(o[0] // BLOCK_SIZE, (o[0] + o[1]) // BLOCK_SIZE)) & blocks]
        else:
            with pytest.raises(AllocError):
                self.fs.release(b * BLOCK_SIZE, n * BLOCK_SIZE)

    @precondition(lambda self: self.owned)
    @rule(data=st.data())
    def release_owned(self, data: st.DataObject) -> None:
        off, n = self.owned.pop(data.draw(st.integers(0, len(self.owned) - 1)))
        self.fs.release(off, n)
        self.free |= set(range(off // BLOCK_SIZE, (off + n) // BLOCK_SIZE))
        with pytest.raises(AllocError):  # double free
            self.fs.release(off, n)

    @rule(n=st.integers(1, NBLOCKS + 1))
    def plan_and_take(self, n: int) -> None:
        if n > len(self.free):
            with pytest.raises(NoSpace):
                self.fs.plan(n * BLOCK_SIZE)
            return
        pieces = self.fs.plan(n * BLOCK_SIZE)
        assert sum(p[1] for p in pieces) == n * BLOCK_SIZE
        seen: set[int] = set()
        for off, ln in pieces:
            assert off % BLOCK_SIZE == 0 and ln % BLOCK_SIZE == 0 and ln > 0
            blocks = set(range(off // BLOCK_SIZE, (off + ln) // BLOCK_SIZE))
            assert blocks <= self.free and not blocks & seen, "plan gave non-free space"
            seen |= blocks
        for off, ln in pieces:
            self.fs.take(off, ln)
            self.owned.append((off, ln))
        self.free -= seen

    @rule(n=st.integers(1, NBLOCKS + 1))
    def find_contiguous(self, n: int) -> None:
        where = self.fs.find_contiguous(n * BLOCK_SIZE)
        runs = any(set(range(b, b + n)) <= self.free for b in range(NBLOCKS))
        if where is None:
            assert not runs
        else:
            assert set(range(where // BLOCK_SIZE, where // BLOCK_SIZE + n)) <= self.free

    @rule()
    def wire_roundtrip(self) -> None:
        again = FreeSpace.from_wire(SIZE, self.fs.to_wire(), self.fs.cursor)
        assert list(again.ranges()) == list(self.fs.ranges())
        assert again.free == self.fs.free and again.cursor == self.fs.cursor
        self.fs = again

    @invariant()
    def matches_model(self) -> None:
        ranges = list(self.fs.ranges())
        prev_end = -1
        blocks: set[int] = set()
        for s, n in ranges:
            assert n > 0 and s > prev_end, f"ranges overlap or touch: {ranges}"
            assert s + n <= NBLOCKS * BLOCK_SIZE
            prev_end = s + n
            blocks |= set(range(s // BLOCK_SIZE, (s + n) // BLOCK_SIZE))
        assert blocks == self.free
        assert self.fs.free == len(self.free) * BLOCK_SIZE
        for b in range(NBLOCKS):
            assert self.fs.is_free(b * BLOCK_SIZE, BLOCK_SIZE) == (b in self.free)


FreeSpaceMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                              deadline=None)
TestFreeSpace = FreeSpaceMachine.TestCase


def test_size_is_rounded_down_to_blocks():
    fs = FreeSpace(10 * BLOCK_SIZE + 4095)
    assert fs.free == 10 * BLOCK_SIZE and list(fs.ranges()) == [(0, 10 * BLOCK_SIZE)]
    assert FreeSpace(4095).free == 0
    assert list(FreeSpace(BLOCK_SIZE, empty=False).ranges()) == []


def test_release_past_usable_end_is_refused():
    """The partial block at a container's end is never free, so it cannot be freed."""
    fs = FreeSpace(2 * BLOCK_SIZE + 1000)
    fs.take(0, BLOCK_SIZE)
    with pytest.raises(AllocError):
        fs.release(2 * BLOCK_SIZE, 1000)
    assert fs.free == BLOCK_SIZE


def test_plan_splits_across_fragments_biggest_first():
    fs = FreeSpace(10 * BLOCK_SIZE)
    for b in (1, 3, 4, 7):  # free: [0] [2] [5,6] [8,9]
        fs.take(b * BLOCK_SIZE, BLOCK_SIZE)
    fs.cursor = 0
    pieces = fs.plan(5 * BLOCK_SIZE)
    assert sum(n for _, n in pieces) == 5 * BLOCK_SIZE
    assert pieces == sorted(pieces)
    with pytest.raises(NoSpace):
        fs.plan(6 * BLOCK_SIZE + 1)


def test_next_fit_keeps_consecutive_allocations_contiguous():
    fs = FreeSpace(100 * BLOCK_SIZE)
    got = []
    for _ in range(5):
        off = fs.find_contiguous(BLOCK_SIZE)
        fs.take(off, BLOCK_SIZE)
        got.append(off)
    assert got == [0, BLOCK_SIZE, 2 * BLOCK_SIZE, 3 * BLOCK_SIZE, 4 * BLOCK_SIZE]


def test_from_wire_rejects_bad_lists():
    good = FreeSpace(10 * BLOCK_SIZE)
    good.take(BLOCK_SIZE, BLOCK_SIZE)
    s, n = good.to_wire()
    from array import array
    for starts, lens in (
        ([0, 100], [200, 10]),  # overlap
        ([0, 100], [100, 10]),  # touching (should have merged)
        ([0], [0]),  # empty range
        ([0], [11 * BLOCK_SIZE]),  # past the end
    ):
        with pytest.raises(AllocError):
            FreeSpace.from_wire(10 * BLOCK_SIZE, [array("q", starts).tobytes(),
                                             array("q", lens).tobytes()])
    with pytest.raises(AllocError):
        FreeSpace.from_wire(10 * BLOCK_SIZE, [s, n[:8]])


# ---------------------------------------------------------------- bitmap


@settings(max_examples=200, deadline=None)
@given(nblocks=st.integers(0, 70),
       ops=st.lists(st.tuples(st.integers(0, 70), st.integers(0, 20)), max_size=12))
def test_bitmap_against_set(nblocks, ops):
    bm = Bitmap(nblocks)
    model: set[int] = set()
    for start, count in ops:
        if count > 0 and start + count > nblocks:
            before = bm.to_bytes()
            with pytest.raises(IndexError):
                bm.set_range(start, count)
            assert bm.to_bytes() == before, "a refused set_range changed bits"
            continue
        newly = bm.set_range(start, count)
        assert newly == len(set(range(start, start + count)) - model)
        model |= set(range(start, start + count))
    assert bm.count() == len(model)
    assert bm.all_set() == (len(model) == nblocks)
    assert [bm.test(b) for b in range(nblocks)] == [b in model for b in range(nblocks)]
    clear = [b for b in range(nblocks) if b not in model]
    assert bm.first_clear() == (clear[0] if clear else None)
    for start in range(0, nblocks, 7):
        later = [b for b in clear if b >= start]
        assert bm.first_clear(start) == (later[0] if later else None)
    again = Bitmap(nblocks, bm.to_bytes())
    assert again == bm and len(bm.to_bytes()) == (nblocks + 7) // 8
    if nblocks >= 5:
        sl = bm.slice(2, nblocks - 3)
        assert [sl.test(i) for i in range(nblocks - 3)] == [
            (2 + i) in model for i in range(nblocks - 3)]


def test_bitmap_rejects_bad_input():
    with pytest.raises(ValueError):
        Bitmap(-1)
    with pytest.raises(ValueError):
        Bitmap(9, b"\x00")  # needs 2 bytes
    with pytest.raises(ValueError):
        Bitmap(9, b"\x00\x02")  # bit 9 set, past the end
    bm = Bitmap(9, b"\xff\x01")
    assert bm.all_set()
    for b in (-1, 9):
        with pytest.raises(IndexError):
            bm.test(b)
    assert Bitmap(3) != Bitmap(4) and Bitmap(3) == Bitmap(3)
    a, b = Bitmap(16), Bitmap(16)
    a.set_range(3, 1)
    assert a != b
