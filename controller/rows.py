"""Table entries on the wire: the state bits, ``Entry``, and compact rows (packed
columns for a whole table). Shared by the controller and the agent; pure (no I/O).

Split out of controller/protocol.py, which re-exports every name here (``P.Entry``,
``P.encode_rows``, ...), so callers use either.
"""

from __future__ import annotations

import operator
import sys
from array import array
from collections.abc import Iterable, Sequence
from itertools import compress
from typing import Any, NamedTuple

# Entry state bits, as stored in the table and sent to agents. A row on the wire is
# [vstart, length, lun, offset, flags]; ZERO rows have lun NO_LUN.
ZERO = 1  # not allocated: reads are zeros, a write faults
NOWRITE = 2  # reads direct, a write faults
INVALID = 4  # every I/O faults
ERROR = 8  # I/O fails with EIO at once
STATE_NAMES = {ZERO: "zero", NOWRITE: "nowrite", INVALID: "invalid", ERROR: "error"}
NO_LUN = -1


class Entry(NamedTuple):
    """One table entry: the controller's extents and the agent's cached rows alike."""

    vstart: int
    length: int
    lun: int
    offset: int
    flags: int

    @property
    def vend(self) -> int:
        return self.vstart + self.length

    def states(self) -> list[str]:
        return state_names(self.flags)

    def clip(self, lo: int, hi: int) -> Entry:
        """The part of this entry inside [lo, hi)."""
        lo, hi = max(lo, self.vstart), min(hi, self.vend)
        off = self.offset + (lo - self.vstart) if self.lun != NO_LUN else 0
        return Entry(lo, hi - lo, self.lun, off, self.flags)


def state_names(flags: int) -> list[str]:
    return [name for bit, name in STATE_NAMES.items() if flags & bit]


# ---------------------------------------------------------------- compact rows
#
# A large answer (a whole table) carries its entries as packed columns instead of a
# list per entry: {"cols": [vstart, length, lun, offset, flags], "invalid": [[lo, hi],
# ...]}, the columns little-endian int64, int64, int32, int64, uint8 bytes. Only
# stored (mapped) entries are sent, in order; the ranges between them are implicit
# zero entries. "invalid" lists ranges (restricted at the controller) whose entries
# the receiver marks INVALID after loading the rows. 29 bytes an extent.

WIRE_COLUMNS = ("q", "q", "i", "q", "B")  # vstart, length, lun, offset, flags
_LITTLE = sys.byteorder == "little"
_INT32 = 1 << 31
MAX_ROW_OFFSET = 1 << 62  # |container offset| of a row: a split of it stays in int64


class RowsError(ValueError):
    """Compact rows that are malformed (wrong types, sizes, order, or past their range)."""


class RowColumns(NamedTuple):
    """Entries tiling [start, end) exactly, as parallel arrays (decode_rows' result).

    Entry i spans [vstart[i], vstart[i+1]) (the last one up to end): lengths are not
    stored. lun and offset of a zero gap are NO_LUN and 0. invalid: ranges inside
    [start, end) to mark INVALID once the entries are loaded.
    """

    vstart: array[int]  # "q"
    lun: array[int]  # "i"
    offset: array[int]  # "q"
    flags: array[int]  # "B"
    invalid: list[tuple[int, int]]


def _wire(a: array[int]) -> bytes:
    if not _LITTLE:
        a = array(a.typecode, a)
        a.byteswap()
    return a.tobytes()


def encode_rows(cols: Sequence[bytes], invalid: Iterable[tuple[int, int]] = ()) -> dict[str, Any]:
    """The compact wire form of stored entries, for answers too large for a list per row.

    cols: five packed columns in native byte order (vstart, length, lun, offset as
    int64, flags as uint8), ordered, non-overlapping, no zero gaps needed: what
    ExtentMap.columns() gives. invalid: (lo, hi) ranges the receiver turns INVALID.
    Raises ValueError if the columns differ in length or a LUN does not fit int32.
    Costs a few copies of the bytes, no Python loop per entry.
    """
    if len(cols) != 5:
        raise ValueError("rows need five columns")
    n = len(cols[0]) // 8
    if any(len(c) != n * k for c, k in zip(cols, (8, 8, 8, 8, 1), strict=True)):
        raise ValueError("row columns differ in length")
    out = [array(t) for t in ("q", "q", "q", "q", "B")]
    for a, raw in zip(out, cols, strict=True):
        a.frombytes(raw)
    words = memoryview(out[2]).cast("B").cast("i")
    low, high = (words[0::2], words[1::2]) if _LITTLE else (words[1::2], words[0::2])
    if high.tobytes() == bytes(4 * n) and not low.tobytes()[3 if _LITTLE else 0::4].translate(
            None, bytes(range(0x80))):
        lun = array("i", low.tobytes())  # every LUN in [0, 2**31): the low words as they are
    else:
        if n and (min(out[2]) < -_INT32 or max(out[2]) >= _INT32):
            raise ValueError("a LUN does not fit in 32 bits")
        lun = array("i", out[2])
    return {"cols": [_wire(out[0]), _wire(out[1]), _wire(lun), _wire(out[3]), cols[4]],
            "invalid": [[lo, hi] for lo, hi in invalid]}


def _exact_int(x: object) -> bool:
    return type(x) is int


def decode_rows(obj: object, start: int, end: int) -> RowColumns:
    """Columns tiling [start, end) from encode_rows' form (untrusted: checked exactly).

    The stored entries must lie inside [start, end), be non-empty, ordered and not
    overlap, with offsets of magnitude below MAX_ROW_OFFSET; the gaps between them
    become zero entries, and a row with lun NO_LUN gets offset 0 (as Entry.clip).
    Raises RowsError for anything malformed: not a map of exactly these keys, not
    five bytes columns of whole items and equal lengths, entries out of order or
    range, bad invalid ranges.
    Costs a few passes over the columns at C speed (no Python loop per entry).
    """
    if type(obj) is not dict or "cols" not in obj or not set(obj) <= {"cols", "invalid"}:
        raise RowsError("compact rows must be a map of cols and invalid")
    cols, invalid = obj["cols"], obj.get("invalid", [])
    if type(cols) is not list or len(cols) != 5 or any(type(c) is not bytes for c in cols):
        raise RowsError("compact rows need five bytes columns")
    arrs = [array(t) for t in WIRE_COLUMNS]
    for a, raw in zip(arrs, cols, strict=True):
        if len(raw) % a.itemsize:
            raise RowsError("a row column is not whole items")
        a.frombytes(raw)
        if not _LITTLE:
            a.byteswap()
    vs, ln, lu, of, fl = arrs
    n = len(vs)
    if any(len(a) != n for a in arrs):
        raise RowsError("row columns differ in length")
    if type(invalid) is not list:
        raise RowsError("invalid must be a list of ranges")
    ranges: list[tuple[int, int]] = []
    for r in invalid:
        if (type(r) is not list or len(r) != 2 or not all(map(_exact_int, r))
                or not start <= r[0] < r[1] <= end):
            raise RowsError(f"bad invalid range {r!r} for [{start}, {end})")
        ranges.append((r[0], r[1]))
    if not n:
        if start >= end:
            return RowColumns(array("q"), array("i"), array("q"), array("B"), ranges)
        return RowColumns(array("q", [start]), array("i", [NO_LUN]), array("q", [0]),
                          array("B", [ZERO]), ranges)
    if min(ln) <= 0 or vs[0] < start or min(of) < -MAX_ROW_OFFSET or max(of) >= MAX_ROW_OFFSET:
        raise RowsError(f"rows are empty, start before {start} or have offsets past 2**62")
    try:
        ends = array("q", map(operator.add, vs, ln))
    except OverflowError:
        raise RowsError("a row ends past 2**63") from None
    if ends[-1] > end:
        raise RowsError(f"rows end at {ends[-1]}, past {end}")
    contiguous = ends[:-1] == vs[1:]
    if not contiguous and not all(map(operator.le, ends[:-1], vs[1:])):
        raise RowsError("rows overlap or are out of order")
    if lu.tobytes().find(b"\xff\xff\xff\xff") >= 0 and NO_LUN in lu:
        # a row without a container has no offset (as Entry.clip has it)
        of = array("q", [0 if x == NO_LUN else o for x, o in zip(lu, of, strict=True)])
    if contiguous and vs[0] == start and ends[-1] == end:
        return RowColumns(vs, lu, of, fl, ranges)
    # the zero gaps: slot 2k is the gap before row k (maybe empty), 2k+1 row k; 2n the tail
    prev = array("q", [start]) + ends
    nxt = vs + array("q", [end])
    keep = bytearray(2 * n + 1)
    keep[0::2] = bytes(map(operator.lt, prev, nxt))
    keep[1::2] = b"\x01" * n
    m = n + 1
    out_vs = array("q", bytes(8 * (2 * n + 1)))
    out_vs[0::2], out_vs[1::2] = prev, vs
    out_lu = array("i", bytes(4 * (2 * n + 1)))
    out_lu[0::2], out_lu[1::2] = array("i", [NO_LUN]) * m, lu
    out_of = array("q", bytes(8 * (2 * n + 1)))
    out_of[1::2] = of
    out_fl = array("B", bytes(2 * n + 1))
    out_fl[0::2], out_fl[1::2] = array("B", [ZERO]) * m, fl
    return RowColumns(array("q", compress(out_vs, keep)), array("i", compress(out_lu, keep)),
                      array("q", compress(out_of, keep)), array("B", compress(out_fl, keep)),
                      ranges)
