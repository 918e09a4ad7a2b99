"""The agent's table (virtfs.mapcache.DiskTable) against the list implementation it
replaced, and the compact row form (protocol.encode_rows / decode_rows) it loads.

The reference is the former list-of-Entry DiskTable, with the changes the array
table made on purpose: rows are checked before anything is applied (a bad answer
changes nothing), a row without a container (lun NO_LUN) is kept with offset 0
(as Entry.clip already made it on any split), exact int fields, and empty rows for
a non-empty range are refused (they used to punch a hole in the tiling).
"""

from __future__ import annotations

import random
from array import array
from bisect import bisect_right
from typing import Any, cast

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from controller.extents import ExtentMap
from controller.protocol import (
    ERROR,
    INVALID,
    NO_LUN,
    NOWRITE,
    ZERO,
    Entry,
    RowsError,
    decode_rows,
    encode_rows,
)
from controller.records import ContainerAdd, DiskCreate, DiskMap
from controller.service import Service, coherence
from controller.state import State
from virtfs.mapcache import DiskTable, TableError

# ---------------------------------------------------------------- the reference


def _ref_entries(rows: list[list[int]]) -> list[Entry]:
    out = []
    for r in rows:
        if type(r) is not list or len(r) != 5 or not all(type(x) is int for x in r):
            raise TableError(f"bad row {r!r}")
        out.append(Entry(r[0], r[1], r[2], 0 if r[2] == NO_LUN else r[3], r[4]))
    return out


def _ref_tile(entries: list[Entry], start: int, end: int) -> None:
    pos = start
    for e in entries:
        if e.vstart != pos or e.length <= 0:
            raise TableError("rows do not tile")
        pos = e.vend
    if (pos != end) if entries else (start < end):
        raise TableError("rows do not cover the range")


class RefTable:
    """The former DiskTable: a list of Entry and a list of starts."""

    def __init__(self, name: str, size: int, epoch: int, rows: list[list[int]],
                 version: int = 0):
        self.name, self.size, self.epoch, self.version = name, size, epoch, version
        self._starts: list[int] = []
        self._entries: list[Entry] = []
        self.load(size, epoch, rows, version, force=True)

    def stale(self, version: int | None) -> bool:
        return version is not None and version < self.version

    def load(self, size: int, epoch: int, rows: list[list[int]], version: int | None = None,
             force: bool = False) -> bool:
        if not force and self.stale(version):
            self.restrict(0, self.size)
            return False
        entries = _ref_entries(rows)
        _ref_tile(entries, 0, size)
        self.size, self.epoch = size, epoch
        if version is not None:
            self.version = version if force else max(self.version, version)
        self._entries = entries
        self._starts = [e.vstart for e in entries]
        return True

    @property
    def allocated(self) -> int:
        return sum(e.length for e in self._entries if not e.flags & ZERO)

    def _index(self, pos: int) -> int:
        return bisect_right(self._starts, pos) - 1

    def pieces(self, offset: int, length: int) -> list[Entry]:
        end = min(offset + length, self.size)
        out = []
        i = max(self._index(offset), 0)
        while i < len(self._entries) and offset < end:
            e = self._entries[i]
            if e.vend > offset:
                out.append(e.clip(offset, end))
                offset = min(e.vend, end)
            i += 1
        return out

    def _split(self, pos: int) -> None:
        if pos <= 0 or pos >= self.size:
            return
        i = self._index(pos)
        e = self._entries[i]
        if e.vstart == pos:
            return
        head, tail = e.clip(e.vstart, pos), e.clip(pos, e.vend)
        self._entries[i : i + 1] = [head, tail]
        self._starts[i : i + 1] = [head.vstart, tail.vstart]

    def resize(self, size: int) -> None:
        if size < self.size:
            self._split(size)
            i = bisect_right(self._starts, size - 1) if size else 0
            del self._entries[i:], self._starts[i:]
        elif size > self.size:
            self._entries.append(Entry(self.size, size - self.size, NO_LUN, 0, ZERO))
            self._starts.append(self.size)
        self.size = size

    def replace(self, start: int, end: int, rows: list[list[int]], size: int | None = None,
                epoch: int | None = None, version: int | None = None) -> bool:
        if self.stale(version):
            self.restrict(start, min(end, self.size))
            return False
        new = _ref_entries(rows)
        end = min(end, self.size if size is None else size)
        _ref_tile(new, start, end)
        if version is not None:
            self.version = version
        if size is not None and size != self.size:
            self.resize(size)
        if start >= end:
            if epoch is not None:
                self.epoch = epoch
            return True
        self._split(start)
        self._split(end)
        i = self._index(start)
        j = bisect_right(self._starts, end - 1)
        self._entries[i:j] = new
        self._starts[i:j] = [e.vstart for e in new]
        if epoch is not None:
            self.epoch = epoch
        return True

    def restrict(self, start: int, end: int) -> None:
        end = min(end, self.size)
        if start >= end:
            return
        rows = [[e.vstart, e.length, e.lun, e.offset, e.flags | INVALID]
                for e in self.pieces(start, end - start)]
        self.replace(start, end, rows)


# ---------------------------------------------------------------- row generation

UNIT = 512
STORED_FLAGS = [0, 0, 0, NOWRITE, INVALID, ERROR, NOWRITE | INVALID]


@st.composite
def tilings(draw: Any, start: int, end: int) -> list[list[int]]:
    """Rows tiling [start, end): zero gaps (sometimes invalid), stored rows of 4 LUNs."""
    if start >= end:
        return []
    inner = sorted(draw(st.sets(st.integers(start + 1, end - 1), max_size=8))
                   if end - start > 1 else [])
    cuts = [start, *inner, end]
    rows = []
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        if draw(st.booleans()):
            rows.append([lo, hi - lo, NO_LUN, 0, ZERO | draw(st.sampled_from([0, 0, INVALID]))])
        else:
            rows.append([lo, hi - lo, draw(st.integers(0, 3)),
                         draw(st.integers(0, 1 << 40)), draw(st.sampled_from(STORED_FLAGS))])
    return rows


def _native(rows: list[list[int]]) -> list[bytes]:
    cols = [array("q"), array("q"), array("q"), array("q"), array("B")]
    for r in rows:
        for c, x in zip(cols, r, strict=True):
            c.append(x)
    return [c.tobytes() for c in cols]


def compact(rows: list[list[int]], rnd: random.Random,
            invalid: list[tuple[int, int]] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    """rows in the compact form, some plain zero rows left implicit (never two adjacent
    ones, which would come back as one gap)."""
    kept = []
    omitted_prev = False
    for r in rows:
        plain_zero = r[2] == NO_LUN and r[3] == 0 and r[4] == ZERO
        if plain_zero and not omitted_prev and rnd.random() < 0.7:
            omitted_prev = True
            continue
        omitted_prev = False
        kept.append(r)
    return encode_rows(_native(kept), invalid)


def sizes() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, 64).map(lambda n: n * UNIT), st.integers(0, 40000))


# ---------------------------------------------------------------- the state machine


class TableMachine(RuleBasedStateMachine):
    """The array table and the reference, fed the same answers in either row form."""

    def __init__(self) -> None:
        super().__init__()
        self.t: DiskTable | None = None
        self.ref: RefTable | None = None
        self.rnd = random.Random(0)

    @rule(data=st.data(), size=sizes(), epoch=st.integers(0, 5), use_compact=st.booleans())
    def create(self, data: Any, size: int, epoch: int, use_compact: bool) -> None:
        rows = data.draw(tilings(0, size))
        wire: Any = compact(rows, self.rnd) if use_compact else rows
        self.t = DiskTable("d", size, epoch, wire, 10)
        self.ref = RefTable("d", size, epoch, rows, 10)

    @precondition(lambda self: self.t is not None)
    @rule(data=st.data(), size=sizes(), version=st.sampled_from([None, 5, 10, 11, 20]),
          use_compact=st.booleans())
    def load(self, data: Any, size: int, version: int | None, use_compact: bool) -> None:
        rows = data.draw(tilings(0, size))
        invalid = data.draw(self._ranges(0, size)) if use_compact else []
        wire: Any = compact(rows, self.rnd, invalid) if use_compact else rows
        assert self.t is not None and self.ref is not None
        a = self.t.load(size, 3, wire, version)
        b = self.ref.load(size, 3, rows, version)
        assert a == b
        if b:
            for lo, hi in invalid:
                self.ref.restrict(lo, hi)

    @staticmethod
    def _ranges(start: int, end: int) -> st.SearchStrategy[list[tuple[int, int]]]:
        if start >= end:
            return st.just([])
        return st.lists(st.tuples(st.integers(start, end - 1), st.integers(1, end - start))
                        .map(lambda p: (p[0], min(end, p[0] + p[1]))), max_size=3)

    @precondition(lambda self: self.t is not None)
    @rule(data=st.data(), use_compact=st.booleans(),
          version=st.sampled_from([None, None, 5, 10, 30]), resize=st.booleans(),
          epoch=st.sampled_from([None, 7]))
    def replace(self, data: Any, use_compact: bool, version: int | None, resize: bool,
                epoch: int | None) -> None:
        assert self.t is not None and self.ref is not None
        size = data.draw(sizes()) if resize else None
        new_size = self.t.size if size is None else size
        start = data.draw(st.integers(0, new_size))
        end = data.draw(st.integers(start, new_size + 2 * UNIT))
        clipped = min(end, new_size)
        rows = data.draw(tilings(start, clipped)) if start < clipped else []
        invalid = data.draw(self._ranges(start, clipped)) if use_compact else []
        wire: Any = compact(rows, self.rnd, invalid) if use_compact else rows
        stale = self.t.stale(version)
        a = self.t.replace(start, end, wire, size=size, epoch=epoch, version=version)
        b = self.ref.replace(start, end, rows, size=size, epoch=epoch, version=version)
        assert a == b == (not stale)
        if b:
            for lo, hi in invalid:
                self.ref.restrict(lo, hi)

    @precondition(lambda self: self.t is not None)
    @rule(data=st.data(), use_compact=st.booleans(), kind=st.integers(0, 5))
    def replace_bad(self, data: Any, use_compact: bool, kind: int) -> None:
        """Rows that do not tile their range: both refuse, neither changes."""
        assert self.t is not None and self.ref is not None
        size = self.t.size
        start = data.draw(st.integers(0, size))
        rows = data.draw(tilings(start, size)) if start < size else []
        if kind == 0 and rows:
            rows = rows[:-1] if len(rows) > 1 else [[*rows[0][:1], rows[0][1] + 1, *rows[0][2:]]]
        elif kind == 1 and rows:
            rows[0] = [rows[0][0] + 1, *rows[0][1:]]
        elif kind == 2 and rows:
            rows[-1] = [*rows[-1][:4], True]  # a bool is not an int here
        elif kind == 3 and rows:
            rows[0] = [rows[0][0], 0, *rows[0][2:]]
        elif kind == 4:
            rows = [[start, size - start + 1, 1, 0, 0]]  # past the end
        else:
            rows = [] if start < size else [[start, 1, 1, 0, 0]]
        before = (list(self.t), self.t.allocated, self.t.version)
        with pytest.raises(TableError):
            self.ref.replace(start, size, rows, version=99)
        with pytest.raises(TableError):
            # (a missing row is an implicit gap in the compact form, not an error)
            if use_compact and kind in (3, 4):
                self.t.replace(start, size, encode_rows(_native(rows)), version=99)
            else:
                self.t.replace(start, size, rows, version=99)
        assert (list(self.t), self.t.allocated, self.t.version) == before

    @precondition(lambda self: self.t is not None)
    @rule(data=st.data())
    def restrict(self, data: Any) -> None:
        assert self.t is not None and self.ref is not None
        start = data.draw(st.integers(-UNIT, self.t.size + UNIT))
        end = data.draw(st.integers(start, self.t.size + 2 * UNIT))
        self.t.restrict(start, end)
        self.ref.restrict(max(start, 0), end)

    @precondition(lambda self: self.t is not None)
    @rule(size=sizes())
    def resize(self, size: int) -> None:
        assert self.t is not None and self.ref is not None
        self.t.resize(size)
        self.ref.resize(size)

    @precondition(lambda self: self.t is not None)
    @rule(data=st.data())
    def pieces(self, data: Any) -> None:
        assert self.t is not None and self.ref is not None
        offset = data.draw(st.integers(-UNIT, self.t.size + UNIT))
        length = data.draw(st.integers(-1, self.t.size + UNIT))
        assert self.t.pieces(offset, length) == self.ref.pieces(offset, length)

    @invariant()
    def same(self) -> None:
        if self.t is None or self.ref is None:
            return
        assert list(self.t) == self.ref._entries
        assert len(self.t) == len(self.ref._entries)
        assert self.t.allocated == self.ref.allocated
        assert (self.t.size, self.t.epoch, self.t.version, self.t.name) == (
            self.ref.size, self.ref.epoch, self.ref.version, self.ref.name)
        pos = 0
        for e in self.t:
            assert e.vstart == pos and e.length > 0
            pos = e.vend
        assert pos == self.t.size


TableMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=30,
                                          deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
test_table_against_reference = TableMachine.TestCase


# ---------------------------------------------------------------- the compact form


def _gap_filled(rows: list[list[int]], start: int, end: int) -> list[list[int]]:
    out, pos = [], start
    for r in rows:
        if r[0] > pos:
            out.append([pos, r[0] - pos, NO_LUN, 0, ZERO])
        out.append([r[0], r[1], r[2], 0 if r[2] == NO_LUN else r[3], r[4]])
        pos = r[0] + r[1]
    if pos < end:
        out.append([pos, end - pos, NO_LUN, 0, ZERO])
    return out


@st.composite
def stored(draw: Any) -> tuple[int, int, list[list[int]]]:
    """(start, end, ordered non-overlapping rows inside [start, end), gaps allowed)."""
    start = draw(st.integers(0, 1 << 20))
    points = sorted(draw(st.sets(st.integers(start, start + 100000), max_size=12)))
    end = (points[-1] if points else start) + draw(st.integers(0, 5000))
    rows = []
    for a, b in zip(points[0::2], points[1::2], strict=False):
        if b > a:
            rows.append([a, b - a, draw(st.sampled_from([NO_LUN, 0, 1, 7, (1 << 31) - 1])),
                         draw(st.integers(0, 1 << 50)), draw(st.integers(0, 255))])
    return start, end, rows


@given(stored())
def test_compact_round_trip(case: tuple[int, int, list[list[int]]]) -> None:
    start, end, rows = case
    wire = encode_rows(_native(rows), [(start, end)] if start < end else [])
    cols = decode_rows(wire, start, end)
    n = len(cols.vstart)
    got = [[cols.vstart[i], (cols.vstart[i + 1] if i + 1 < n else end) - cols.vstart[i],
            cols.lun[i], cols.offset[i], cols.flags[i]] for i in range(n)]
    assert got == _gap_filled(rows, start, end)
    assert cols.invalid == ([(start, end)] if start < end else [])
    # columns are little-endian int64, int64, int32, int64, uint8
    assert [len(c) for c in wire["cols"]] == [8 * len(rows)] * 2 + [4 * len(rows)] + [
        8 * len(rows), len(rows)]


def test_encode_rows_luns() -> None:
    rows = [[0, 1, 5, 0, 0], [1, 1, NO_LUN, 0, ZERO], [2, 1, (1 << 31) - 1, 3, 0]]
    wire = encode_rows(_native(rows))
    assert array("i", wire["cols"][2]).tolist() == [5, NO_LUN, (1 << 31) - 1]
    with pytest.raises(ValueError):
        encode_rows(_native([[0, 1, 1 << 31, 0, 0]]))
    with pytest.raises(ValueError):
        encode_rows(_native(rows)[:4])


def _good() -> dict[str, Any]:
    return encode_rows(_native([[4096, 4096, 1, 0, 0], [12288, 4096, 2, 8192, NOWRITE]]),
                       [(0, 100)])


def _mutate(fn: Any) -> dict[str, Any]:
    w = _good()
    fn(w)
    return w


def _col(i: int, values: list[int]) -> Any:
    t = ("q", "q", "i", "q", "B")[i]
    return lambda w: w["cols"].__setitem__(i, array(t, values).tobytes())


BAD: list[tuple[str, Any]] = [
    ("not a map", [1, 2]),
    ("a list of rows in a map", {"rows": []}),
    ("extra key", _mutate(lambda w: w.__setitem__("x", 1))),
    ("no cols", {"invalid": []}),
    ("four columns", _mutate(lambda w: w["cols"].pop())),
    ("cols a tuple", _mutate(lambda w: w.__setitem__("cols", tuple(w["cols"])))),
    ("a str column", _mutate(lambda w: w["cols"].__setitem__(0, "abc"))),
    ("a bytearray column", _mutate(lambda w: w["cols"].__setitem__(1, bytearray(16)))),
    ("a list column", _mutate(lambda w: w["cols"].__setitem__(4, [0, 0]))),
    ("part of an item", _mutate(lambda w: w["cols"].__setitem__(0, w["cols"][0] + b"\0"))),
    ("a short column", _mutate(lambda w: w["cols"].__setitem__(4, b"\0"))),
    ("a short lun column", _mutate(_col(2, [1]))),
    ("zero length", _mutate(_col(1, [0, 4096]))),
    ("negative length", _mutate(_col(1, [-4096, 4096]))),
    ("overlap", _mutate(_col(1, [8193, 4096]))),
    ("out of order", _mutate(_col(0, [12288, 4096]))),
    ("past the end", _mutate(_col(0, [4096, 65536 - 4095]))),
    ("ends past 2**63", _mutate(_col(1, [4096, (1 << 63) - 1]))),
    ("huge offset", _mutate(_col(3, [0, 1 << 62]))),
    ("very negative offset", _mutate(_col(3, [-(1 << 62) - 1, 0]))),
    ("invalid not a list", _mutate(lambda w: w.__setitem__("invalid", {}))),
    ("invalid range a tuple", _mutate(lambda w: w.__setitem__("invalid", [(0, 1)]))),
    ("invalid range of bools", _mutate(lambda w: w.__setitem__("invalid", [[False, True]]))),
    ("invalid range empty", _mutate(lambda w: w.__setitem__("invalid", [[5, 5]]))),
    ("invalid range past the end", _mutate(lambda w: w.__setitem__("invalid", [[0, 65537]]))),
    ("invalid range of 3", _mutate(lambda w: w.__setitem__("invalid", [[0, 1, 2]]))),
]


@pytest.mark.parametrize("wire", [w for _, w in BAD], ids=[k for k, _ in BAD])
def test_malformed_compact_rows(wire: Any) -> None:
    if type(wire) is dict:
        with pytest.raises(RowsError):
            decode_rows(wire, 0, 65536)
    with pytest.raises(TableError):
        DiskTable("d", 65536, 1, wire)
    t = DiskTable("d", 65536, 1, _good())
    before = list(t)
    with pytest.raises(TableError):
        t.load(65536, 2, wire, 5)
    with pytest.raises(TableError):
        t.replace(0, 65536, wire, version=5)
    assert list(t) == before and t.version == 0 and t.epoch == 1


def test_good_compact_rows() -> None:
    t = DiskTable("d", 65536, 1, _good())
    assert list(t) == [Entry(0, 100, NO_LUN, 0, ZERO | INVALID),
                       Entry(100, 3996, NO_LUN, 0, ZERO),
                       Entry(4096, 4096, 1, 0, 0), Entry(8192, 4096, NO_LUN, 0, ZERO),
                       Entry(12288, 4096, 2, 8192, NOWRITE),
                       Entry(16384, 65536 - 16384, NO_LUN, 0, ZERO)]
    assert t.allocated == 8192


def test_bad_list_rows_and_sizes() -> None:
    for rows in ([[0, 10, 1, 0, 256]], [[0, 10, 1 << 31, 0, 0]], [[0, 10, 1, 1 << 62, 0]],
                 [(0, 10, 1, 0, 0)], [[0, 10, 1, 0]], [[0, 10.0, 1, 0, 0]], "rows", None):
        with pytest.raises(TableError):
            DiskTable("d", 10, 1, cast(Any, rows))
    with pytest.raises(TableError):
        DiskTable("d", -1, 1, [])
    t = DiskTable("d", 10, 1, [[0, 10, 1, 0, 0]])
    with pytest.raises(TableError):
        t.resize(1 << 63)
    with pytest.raises(TableError):
        t.replace(-5, 5, [[-5, 10, 1, 0, 0]])
    with pytest.raises(TableError):
        t.replace(0, cast(Any, "10"), [[0, 10, 1, 0, 0]])
    assert list(t) == [Entry(0, 10, 1, 0, 0)]
    # a version stamp that is not an int is not trusted: the range is only restricted
    assert not t.replace(0, 5, [[0, 5, 2, 0, 0]], version=cast(Any, "9"))
    assert list(t) == [Entry(0, 5, 1, 0, INVALID), Entry(5, 5, 1, 5, 0)]


def test_large_table_is_cheap() -> None:
    """A fragmented 1 TiB disk: 262,144 extents in random order, loaded at C speed."""
    seg, n = 4 << 20, 262144
    order = list(range(n))
    random.Random(1).shuffle(order)
    vs = array("q", range(0, n * seg, seg))
    cols = [vs.tobytes(), array("q", [seg]).tobytes() * n, array("q", [1]).tobytes() * n,
            array("q", (o * seg for o in order)).tobytes(), bytes(n)]
    wire = encode_rows(cols, [(seg, 3 * seg)])
    t = DiskTable("big", n * seg, 1, wire)
    assert len(t) == n and t.allocated == n * seg
    assert t.pieces(seg * 5 + 7, 10) == [Entry(seg * 5 + 7, 10, 1, order[5] * seg + 7, 0)]
    assert t.pieces(seg, 1)[0].flags == INVALID
    t.restrict(0, t.size)
    assert all(e.flags & INVALID for e in t.pieces(0, t.size)) and t.allocated == n * seg
    t.resize(seg * 10 + 5)
    assert len(t) == 11 and t.allocated == seg * 10 + 5


# ---------------------------------------------------------------- controller side


@given(st.lists(st.tuples(st.integers(0, 63), st.integers(1, 8)), max_size=20),
       st.integers(1, 300000))
def test_extent_columns_match_entries(maps: list[tuple[int, int]], size: int) -> None:
    m = ExtentMap()
    for i, (blk, n) in enumerate(maps):
        if m.is_gap(blk * 4096, (blk + n) * 4096):
            m.insert(blk * 4096, n * 4096, 1 + i % 2, (i * 16 + blk) * 4096)
    rnd = random.Random(size)
    for _ in range(5):
        start = rnd.randrange(0, 70 * 4096)
        end = rnd.randrange(start, 80 * 4096)
        rows = [list(e) for e in m.entries(start, end) if not e.flags & ZERO]
        assert m.columns(start, end) == _native(rows)


class _Durable:
    strict_seq = 0  # Journal.strict_seq: what answers wait for

    async def wait_durable(self, seq: int) -> None:
        return None


def _thin_state(nseg: int, seg: int, seed: int) -> State:
    s = State()
    s.apply(ContainerAdd("c0", 1, "/nonexistent/c0", 2 * nseg * seg, True), 1)
    s.apply(DiskCreate("d", nseg * seg + 1000, seg, False, None, 1, 0.0, []), 2)
    order = list(range(nseg))
    rnd = random.Random(seed)
    rnd.shuffle(order)
    for k, i in enumerate(order[: nseg * 3 // 4]):  # a quarter stays unallocated
        s.apply(DiskMap("d", [(i * seg, seg, 1, 2 * k * seg)]), 3 + k)
    return s


@pytest.mark.parametrize("nseg,threshold", [(6000, None), (300, 0)])
def test_answer_compact_equals_rows(tmp_path: Any, monkeypatch: Any, nseg: int,
                                    threshold: int | None) -> None:
    """The whole-table answer in compact form loads to the same table as the row list,
    with restricted ranges (overlapping, unaligned, past the end) invalid in both."""
    if threshold is not None:
        monkeypatch.setattr(coherence, "COMPACT_MIN_EXTENTS", threshold)
    seg = 4096
    state = _thin_state(nseg, seg, nseg)
    d = state.disks["d"]
    assert len(d.extents) >= 64

    async def check() -> None:
        svc = Service(state, cast(Any, _Durable()), str(tmp_path))
        rnd = random.Random(2)
        for n_restricted in (0, 1, 4):
            svc.coherence._restricted[d.uid] = [
                (a, a + rnd.randrange(1, 40 * seg)) for a in
                (rnd.randrange(0, d.size + 10 * seg) for _ in range(n_restricted))]
            ans = await svc.coherence.answer(d, 0, d.size)
            assert isinstance(ans["rows"], dict)
            rows = svc.coherence.rows(d, 0, d.size)
            got, want = DiskTable("d", d.size, 1, ans["rows"]), DiskTable("d", d.size, 1, rows)
            assert list(got) == list(want) and got.allocated == want.allocated == d.allocated
            if n_restricted:
                assert any(e.flags & INVALID for e in got)
            # a partial answer (a fault's) stays a list of rows
            part = await svc.coherence.answer(d, seg, 3 * seg)
            assert isinstance(part["rows"], list)

    trio.run(check)
