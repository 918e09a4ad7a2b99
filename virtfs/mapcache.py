"""The agent's volatile ("first") table of one open disk, and its in-flight I/O.

The table is a complete copy of the disk's entries as the controller last
sent them: contiguous rows covering [0, size), zero gaps included. It is
replaced piecewise by fault replies and controller pushes, and wholesale on
reload. Pure logic, no I/O.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator

import trio

from controller.protocol import INVALID, NO_LUN, ZERO, Entry


class TableError(ValueError):
    pass


def _rows_to_entries(rows: list[list[int]]) -> list[Entry]:
    out = []
    for r in rows:
        if not isinstance(r, list) or len(r) != 5 or not all(isinstance(x, int) for x in r):
            raise TableError(f"bad row {r!r}")
        out.append(Entry(*r))
    return out


class DiskTable:
    def __init__(self, name: str, size: int, epoch: int, rows: list[list[int]],
                 version: int = 0):
        self.name = name
        self.size = size
        self.epoch = epoch
        # the controller's version stamp of the newest answer applied; an older answer
        # arriving later (replies and pushes can be handled out of order) is not trusted
        self.version = version
        self._starts: list[int] = []
        self._entries: list[Entry] = []
        self.load(size, epoch, rows, version, force=True)

    def stale(self, version: int | None) -> bool:
        return version is not None and version < self.version

    def load(self, size: int, epoch: int, rows: list[list[int]], version: int | None = None,
             force: bool = False) -> bool:
        """Replace the whole table; an answer older than the table only restricts it.

        force: only for the first load (the constructor).
        """
        if not force and self.stale(version):
            self.restrict(0, self.size)
            return False
        entries = _rows_to_entries(rows)
        pos = 0
        for e in entries:
            if e.vstart != pos or e.length <= 0:
                raise TableError(f"rows do not tile the disk at {pos}")
            pos = e.vend
        if pos != size:
            raise TableError(f"rows cover {pos} bytes of a {size}-byte disk")
        self.size, self.epoch = size, epoch
        if version is not None:
            self.version = version if force else max(self.version, version)
        self._entries = entries
        self._starts = [e.vstart for e in entries]
        return True

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def allocated(self) -> int:
        return sum(e.length for e in self._entries if not e.flags & ZERO)

    def _index(self, pos: int) -> int:
        return bisect_right(self._starts, pos) - 1

    def pieces(self, offset: int, length: int) -> list[Entry]:
        """The entries covering [offset, offset+length) (clipped to the disk), clipped."""
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
        """Replace [start, end) with rows that tile it exactly (after resizing to size).

        An answer older than what the table already holds is not applied: the range is
        made invalid instead, so the next I/O there faults and fetches the truth.
        """
        if self.stale(version):
            self.restrict(start, min(end, self.size))
            return False
        if version is not None:
            self.version = version
        if size is not None and size != self.size:
            self.resize(size)
        new = _rows_to_entries(rows)
        end = min(end, self.size)
        pos = start
        for e in new:
            if e.vstart != pos or e.length <= 0:
                raise TableError(f"rows do not tile [{start}, {end}) at {pos}")
            pos = e.vend
        if pos != end and new:
            raise TableError(f"rows end at {pos}, not {end}")
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
        """Mark [start, end) invalid locally (every I/O there will fault)."""
        end = min(end, self.size)
        if start >= end:
            return
        rows = [[e.vstart, e.length, e.lun, e.offset, e.flags | INVALID]
                for e in self.pieces(start, end - start)]
        self.replace(start, end, rows)


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

    async def drain(self, start: int, end: int) -> None:
        while self.busy(start, end):
            if self._changed is None:
                self._changed = trio.Event()
            await self._changed.wait()
