"""The agent's volatile ("first") table of one open disk, and its in-flight I/O.

The table is a complete copy of the disk's entries as the controller last
sent them: contiguous entries covering [0, size), zero gaps included. It is
replaced piecewise by fault replies and controller pushes, and wholesale on
reload. Rows arrive as a list of [vstart, length, lun, offset, flags] (small
answers) or in the compact form of ``protocol.encode_rows`` (whole tables).

The entries are parallel arrays (vstart, lun, offset, flags, fence generation:
25 bytes an entry; an entry ends where the next one starts), so a fragmented
1 TiB disk (262,144 entries) takes about 6.3 MiB and loads at C speed; ``Entry``
objects are made only for what ``pieces()`` and iteration hand out. Pure logic,
no I/O.

A "freeze" push (a snapshot being taken, docs/snapshots.md) makes every entry
held nowrite in O(1): ``fence()`` bumps the table's generation, and an entry
whose generation is older reads as nowrite. Entries installed later by an answer
at least as new as the freeze carry the new generation and are as sent (the
controller's rows already say nowrite where writes must still fault).
"""

from __future__ import annotations

import operator
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterator
from itertools import chain, compress, islice
from typing import Any

import trio

from controller.protocol import (
    INVALID,
    MAX_ROW_OFFSET,
    NO_LUN,
    NOWRITE,
    ZERO,
    Entry,
    RowColumns,
    RowsError,
    decode_rows,
)

Rows = list[list[int]] | dict[str, Any]  # a list per row, or protocol.encode_rows' form

MAX_TABLE_SIZE = 1 << 62  # largest disk size a table accepts (the controller's is 2**60)
_NOT_ZERO = bytes(0 if f & ZERO else 1 for f in range(256))  # flags -> counts as allocated
_OR_INVALID = bytes(f | INVALID for f in range(256))


class TableError(ValueError):
    """Rows or sizes that cannot be applied: malformed, or not tiling their range."""


def _list_columns(rows: object, start: int, end: int) -> RowColumns:
    """Columns from a list of [vstart, length, lun, offset, flags] tiling [start, end)."""
    if type(rows) is not list:
        raise TableError(f"rows must be a list or compact rows, not {type(rows).__name__}")
    vs, lu, of, fl = array("q"), array("i"), array("q"), array("B")
    pos = start
    for r in rows:
        if type(r) is not list or len(r) != 5 or not all(type(x) is int for x in r):
            raise TableError(f"bad row {r!r}")
        v, n, lun, off, flags = r
        if v != pos or n <= 0:
            raise TableError(f"rows do not tile [{start}, {end}) at {pos}")
        if not -MAX_ROW_OFFSET <= off < MAX_ROW_OFFSET:
            raise TableError(f"bad row {r!r}: offset out of range")
        try:
            vs.append(v)
            lu.append(lun)
            of.append(0 if lun == NO_LUN else off)  # no container, no offset (Entry.clip)
            fl.append(flags)
        except OverflowError:
            raise TableError(f"bad row {r!r}: a field out of range") from None
        pos = v + n
    if (pos != end) if rows else (start < end):
        raise TableError(f"rows cover [{start}, {pos}), not [{start}, {end})")
    return RowColumns(vs, lu, of, fl, [])


def _columns(rows: object, start: int, end: int) -> RowColumns:
    if type(rows) is dict:
        try:
            return decode_rows(rows, start, end)
        except RowsError as e:
            raise TableError(str(e)) from None
    return _list_columns(rows, start, end)


def _allocated(vs: array[int], fl: array[int], stop: int) -> int:
    """Bytes in entries without ZERO; entry i ends at vs[i+1], the last one at stop."""
    if not vs:
        return 0
    ends = chain(islice(vs, 1, None), (stop,))
    keep = fl.tobytes().translate(_NOT_ZERO)
    return sum(compress(map(operator.sub, ends, vs), keep))


def _check_size(size: object) -> int:
    if type(size) is not int or not 0 <= size <= MAX_TABLE_SIZE:
        raise TableError(f"bad disk size {size!r}")
    return size


class DiskTable:
    """The cached entries of one open disk, tiling [0, size), with the epoch and the
    version stamp ("v") of the newest answer applied.

    rows (here and in load/replace): a list of [vstart, length, lun, offset, flags]
    or the compact form of protocol.encode_rows. Raises TableError if they are
    malformed or do not tile the disk exactly. A row without a container (lun
    NO_LUN) is kept with offset 0.
    """

    def __init__(self, name: str, size: int, epoch: int, rows: Rows, version: int = 0):
        self.name = name
        self.size = size
        self.epoch = epoch
        # the controller's version stamp of the newest answer applied; an older answer
        # arriving later (replies and pushes can be handled out of order) is not trusted
        self.version = version
        self._vs = array("q")  # entry starts; entry i ends at _vs[i+1] (the last at size)
        self._lu = array("i")
        self._of = array("q")
        self._fl = array("B")
        # fence generation of each entry; one older than self.gen reads as nowrite
        self._gen = array("I")
        self.gen = 0
        self._alloc = 0  # bytes in entries without ZERO (st_blocks: read on every stat)
        # called (no arguments) before any change of the entries or size returns:
        # the C fast path's image of the table is emptied (virtfs/cfast.py)
        self.on_change: Callable[[], None] | None = None
        self.load(size, epoch, rows, version, force=True)

    def stale(self, version: int | None) -> bool:
        """Whether an answer stamped version is older than what the table holds (a
        stamp that is not an int is not trusted either)."""
        if version is None:
            return False
        return type(version) is not int or version < self.version

    def load(self, size: int, epoch: int, rows: Rows, version: int | None = None,
             force: bool = False) -> bool:
        """Replace the whole table; an answer older than the table only restricts it.

        force: only for the first load (the constructor). Returns whether the rows
        were applied. Raises TableError (and changes nothing) on bad rows or size.
        """
        if not force and self.stale(version):
            self.restrict(0, self.size)
            return False
        cols = _columns(rows, 0, _check_size(size))
        self._changed()
        self.size, self.epoch = size, epoch
        if version is not None:
            self.version = version if force else max(self.version, version)
        self._vs, self._lu, self._of, self._fl = cols.vstart, cols.lun, cols.offset, cols.flags
        self._gen = array("I", [self.gen]) * len(self._vs)
        self._alloc = _allocated(self._vs, self._fl, size)
        for lo, hi in cols.invalid:
            self.restrict(lo, hi)
        return True

    def __iter__(self) -> Iterator[Entry]:
        """The entries in order, made as they are read (do not change the table meanwhile);
        an entry from before the last fence() is nowrite."""
        vs = self._vs
        lengths = map(operator.sub, chain(islice(vs, 1, None), (self.size,)), vs)
        gen = self.gen
        flags = map(lambda f, g: f if g == gen else f | NOWRITE, self._fl, self._gen)
        return map(Entry, vs, lengths, self._lu, self._of, flags)

    def fence(self, version: int | None) -> None:
        """Make every entry held now nowrite, in O(1) (a "freeze" push: a snapshot is
        being taken). Entries installed afterwards by replace/load carry the new
        generation and are as sent. version: the push's stamp ("v"); the table's
        version rises to it, so an answer older than the freeze is not applied (it only
        restricts: DiskTable.replace) and cannot make an entry writable again."""
        self._changed()
        self.gen += 1
        if type(version) is int:
            self.version = max(self.version, version)

    def __len__(self) -> int:
        return len(self._vs)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    @property
    def allocated(self) -> int:
        """Bytes in entries that are not zero (any other state counts): O(1)."""
        return self._alloc

    def _end(self, i: int) -> int:
        return self._vs[i + 1] if i + 1 < len(self._vs) else self.size

    def _bytes(self, i: int, j: int) -> int:
        """Allocated bytes in entries [i, j)."""
        if i >= j:
            return 0
        return _allocated(self._vs[i:j], self._fl[i:j], self._end(j - 1))

    def pieces(self, offset: int, length: int) -> list[Entry]:
        """The entries covering [offset, offset+length) (clipped to the disk), clipped."""
        size = self.size
        end = min(offset + length, size)
        out: list[Entry] = []
        if offset >= end:
            return out
        vs, lu, gen, cur = self._vs, self._lu, self._gen, self.gen
        n = len(vs)
        i = max(bisect_right(vs, offset) - 1, 0)
        while i < n and offset < end:
            v = vs[i]
            vend = vs[i + 1] if i + 1 < n else size
            if vend > offset:  # the entry clipped to [offset, end), as Entry.clip
                lo = v if v > offset else offset
                hi = vend if vend < end else end
                lun = lu[i]
                fl = self._fl[i] if gen[i] == cur else self._fl[i] | NOWRITE  # fence()
                out.append(Entry(lo, hi - lo, lun,
                                 self._of[i] + (lo - v) if lun != NO_LUN else 0, fl))
                offset = hi
            i += 1
        return out

    def seek(self, offset: int, data: bool) -> int | None:
        """lseek SEEK_DATA (data) / SEEK_HOLE: the first offset >= offset that is data
        (any entry but a zero one) or a hole (a zero entry; the end of the disk counts
        as one). None: offset is at or past the end, or no data follows (ENXIO)."""
        size = self.size
        if not 0 <= offset < size:
            return None
        vs, fl = self._vs, self._fl
        for i in range(max(bisect_right(vs, offset) - 1, 0), len(vs)):
            f = fl[i]
            if (not (f & ZERO and not f & INVALID)) == data:
                return max(vs[i], offset)
        return None if data else size

    def _split(self, pos: int) -> None:
        """Make pos an entry boundary (inside the disk)."""
        if pos <= 0 or pos >= self.size:
            return
        vs = self._vs
        i = bisect_right(vs, pos) - 1
        if vs[i] == pos:
            return
        lun = self._lu[i]
        off = 0 if lun == NO_LUN else self._of[i] + (pos - vs[i])
        vs.insert(i + 1, pos)
        self._lu.insert(i + 1, lun)
        self._of.insert(i + 1, off)
        self._fl.insert(i + 1, self._fl[i])
        self._gen.insert(i + 1, self._gen[i])

    def _range(self, start: int, end: int) -> tuple[int, int]:
        """Indexes [i, j) of the entries making up [start, end), split at both ends."""
        self._split(start)
        self._split(end)
        return bisect_right(self._vs, start) - 1, bisect_right(self._vs, end - 1)

    def resize(self, size: int) -> None:
        """Cut the table at size, or extend it with a zero entry. TableError on a bad size."""
        _check_size(size)
        if size != self.size:
            self._changed()
        if size < self.size:
            self._split(size)
            i = bisect_right(self._vs, size - 1) if size else 0
            self._alloc -= self._bytes(i, len(self._vs))
            for a in (self._vs, self._lu, self._of, self._fl, self._gen):
                del a[i:]
        elif size > self.size:
            self._vs.append(self.size)
            self._lu.append(NO_LUN)
            self._of.append(0)
            self._fl.append(ZERO)
            self._gen.append(self.gen)
        self.size = size

    def replace(self, start: int, end: int, rows: Rows, size: int | None = None,
                epoch: int | None = None, version: int | None = None) -> bool:
        """Replace [start, end) with rows that tile it exactly (after resizing to size).

        An answer older than what the table already holds is not applied: the range is
        made invalid instead, so the next I/O there faults and fetches the truth.
        Returns whether the rows were applied. Raises TableError (and changes nothing)
        if they are malformed or do not tile [start, min(end, size)).
        """
        if type(start) is not int or type(end) is not int or start < 0:
            raise TableError(f"bad range [{start!r}, {end!r})")
        if self.stale(version):
            self.restrict(start, min(end, self.size))
            return False
        new_size = self.size if size is None else _check_size(size)
        end = min(end, new_size)
        cols = _columns(rows, start, end)
        self._changed()
        if version is not None:
            self.version = version
        if new_size != self.size:
            self.resize(new_size)
        if start < end:
            i, j = self._range(start, end)
            self._alloc += _allocated(cols.vstart, cols.flags, end) - self._bytes(i, j)
            self._vs[i:j] = cols.vstart
            self._lu[i:j] = cols.lun
            self._of[i:j] = cols.offset
            self._fl[i:j] = cols.flags
            self._gen[i:j] = array("I", [self.gen]) * len(cols.flags)
        if epoch is not None:
            self.epoch = epoch
        for lo, hi in cols.invalid:
            self.restrict(lo, hi)
        return True

    def restrict(self, start: int, end: int) -> None:
        """Mark [start, end) invalid locally (every I/O there will fault)."""
        start, end = max(start, 0), min(end, self.size)
        if start >= end:
            return
        self._changed()
        i, j = self._range(start, end)
        self._fl[i:j] = array("B", self._fl[i:j].tobytes().translate(_OR_INVALID))


class Inflight:
    """Ranges with I/O in progress, so a restriction can wait for them to drain."""

    def __init__(self) -> None:
        self._ops: dict[int, tuple[int, int]] = {}
        self._next = 0
        self._changed: trio.Event | None = None  # only while someone drains

    def begin(self, start: int, end: int) -> int:
        op = self._next
        self._next += 1
        self._ops[op] = (start, end)
        return op

    def end(self, op: int) -> None:
        del self._ops[op]
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def busy(self, start: int, end: int) -> bool:
        return any(lo < end and start < hi for lo, hi in self._ops.values())

    async def settle(self) -> None:
        """Wait until every I/O begun before this call has ended (later ones are not
        waited for, so a busy disk cannot starve it)."""
        mark = self._next
        while any(op < mark for op in self._ops):
            if self._changed is None:
                self._changed = trio.Event()
            await self._changed.wait()

    async def drain(self, start: int, end: int) -> None:
        while self.busy(start, end):
            if self._changed is None:
                self._changed = trio.Event()
            await self._changed.wait()
