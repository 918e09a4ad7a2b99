"""A disk's segment map: sorted, non-overlapping extents of differing sizes (pure).

Only mapped ranges are stored; a gap reads as an implicit ``zero`` entry
(thin, unallocated). Extents are kept in chunks of parallel ``array``s, so a
fully allocated 1 TiB thin disk at 4 MiB segments (262,144 extents) costs about
9 MiB and an insert moves at most one chunk. Adjacent extents that are
contiguous on the same container with the same state merge, up to
``MAX_EXTENT`` bytes, so a thick disk is a handful of entries.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Iterator

# Entry states are bit flags (protocol.py); ZERO only appears on synthesised gap entries.
from .protocol import (  # noqa: E402, F401
    ERROR,
    INVALID,
    NO_LUN,
    NOWRITE,
    STATE_NAMES,
    ZERO,
    Entry,
    state_names,
)

MAX_EXTENT = 32 << 30
_CHUNK = 512


Extent = Entry  # a stored extent is a table entry


class ExtentError(ValueError):
    """An operation that would break the map's invariants."""


class _Chunk:
    __slots__ = ("vs", "ln", "lu", "of", "fl")

    def __init__(self) -> None:
        self.vs = array("q")
        self.ln = array("q")
        self.lu = array("l")
        self.of = array("q")
        self.fl = array("B")

    def get(self, i: int) -> Extent:
        return Extent(self.vs[i], self.ln[i], self.lu[i], self.of[i], self.fl[i])

    def put(self, i: int, e: Extent) -> None:
        self.vs[i], self.ln[i], self.lu[i], self.of[i], self.fl[i] = e

    def insert(self, i: int, e: Extent) -> None:
        for arr, v in zip((self.vs, self.ln, self.lu, self.of, self.fl), e, strict=True):
            arr.insert(i, v)

    def delete(self, i: int) -> None:
        for arr in (self.vs, self.ln, self.lu, self.of, self.fl):
            del arr[i]

    def split(self) -> _Chunk:
        half = len(self.vs) // 2
        other = _Chunk()
        for name in self.__slots__:
            mine = getattr(self, name)
            setattr(other, name, mine[half:])
            del mine[half:]
        return other

    def nbytes(self) -> int:
        return sum(
            a.buffer_info()[1] * a.itemsize for a in (self.vs, self.ln, self.lu, self.of, self.fl)
        )


def _mergeable(a: Extent, b: Extent) -> bool:
    return (
        a.vend == b.vstart
        and a.lun == b.lun
        and a.offset + a.length == b.offset
        and a.flags == b.flags
        and a.length + b.length <= MAX_EXTENT
    )


class ExtentMap:
    """Stored (mapped) extents of one disk, ordered by vstart."""

    def __init__(self) -> None:
        self._chunks: list[_Chunk] = []
        self._firsts: list[int] = []
        self._count = 0
        self._mapped = 0

    # ------------------------------------------------------------ queries
    def __len__(self) -> int:
        return self._count

    @property
    def mapped_bytes(self) -> int:
        return self._mapped

    def memory_bytes(self) -> int:
        return sum(c.nbytes() for c in self._chunks)

    def _locate(self, pos: int) -> tuple[int, int]:
        """(chunk, index) of the last extent with vstart <= pos; (-1, -1) if none."""
        ci = bisect_right(self._firsts, pos) - 1
        if ci < 0:
            return -1, -1
        return ci, bisect_right(self._chunks[ci].vs, pos) - 1

    def _next(self, ci: int, i: int) -> tuple[int, int]:
        if ci < 0:
            return (0, 0) if self._chunks else (-1, -1)
        i += 1
        if i >= len(self._chunks[ci].vs):
            ci, i = ci + 1, 0
            if ci >= len(self._chunks):
                return -1, -1
        return ci, i

    def __iter__(self) -> Iterator[Extent]:
        for c in self._chunks:
            yield from map(Extent, c.vs, c.ln, c.lu, c.of, c.fl)

    def find(self, pos: int) -> Extent | None:
        """The stored extent containing pos, if any."""
        ci, i = self._locate(pos)
        if ci < 0:
            return None
        e = self._chunks[ci].get(i)
        return e if pos < e.vend else None

    def stored_in(self, start: int, end: int) -> Iterator[Extent]:
        """Stored extents overlapping [start, end), unclipped."""
        if end <= start:  # an empty range overlaps nothing (else a 0-length entry leaks out)
            return
        ci, i = self._locate(start)
        if ci >= 0 and self._chunks[ci].get(i).vend <= start:
            ci, i = self._next(ci, i)
        elif ci < 0:
            ci, i = (0, 0) if self._chunks else (-1, -1)
        while ci >= 0:
            e = self._chunks[ci].get(i)
            if e.vstart >= end:
                return
            yield e
            ci, i = self._next(ci, i)

    def entries(self, start: int, end: int) -> Iterator[Extent]:
        """Entries covering [start, end) exactly: stored extents clipped, gaps as zero."""
        pos = start
        for e in self.stored_in(start, end):
            if e.vstart > pos:
                yield Extent(pos, e.vstart - pos, NO_LUN, 0, ZERO)
                pos = e.vstart
            lo, hi = max(e.vstart, pos), min(e.vend, end)
            yield Extent(lo, hi - lo, e.lun, e.offset + (lo - e.vstart), e.flags)
            pos = hi
        if pos < end:
            yield Extent(pos, end - pos, NO_LUN, 0, ZERO)

    def entry_at(self, pos: int, end: int) -> Extent:
        """The whole entry (stored, or the zero gap up to the next extent or end) at pos."""
        ci, i = self._locate(pos)
        if ci >= 0:
            e = self._chunks[ci].get(i)
            if pos < e.vend:
                return e
            gap_start = e.vend
        else:
            gap_start = 0
        nci, ni = self._next(ci, i)
        gap_end = self._chunks[nci].vs[ni] if nci >= 0 else end
        return Extent(gap_start, min(gap_end, end) - gap_start, NO_LUN, 0, ZERO)

    # ------------------------------------------------------------ mutation
    def _insert_raw(self, e: Extent) -> None:
        ci, i = self._locate(e.vstart)
        if ci < 0:
            if not self._chunks:
                self._chunks.append(_Chunk())
                self._firsts.append(e.vstart)
            ci, i = 0, -1
        chunk = self._chunks[ci]
        chunk.insert(i + 1, e)
        if i + 1 == 0:
            self._firsts[ci] = e.vstart
        if len(chunk.vs) > 2 * _CHUNK:
            other = chunk.split()
            self._chunks.insert(ci + 1, other)
            self._firsts.insert(ci + 1, other.vs[0])
        self._count += 1
        self._mapped += e.length

    def _delete_raw(self, vstart: int) -> Extent:
        ci, i = self._locate(vstart)
        chunk = self._chunks[ci]
        e = chunk.get(i)
        if e.vstart != vstart:
            raise ExtentError(f"no extent starts at {vstart}")
        chunk.delete(i)
        if not chunk.vs:
            del self._chunks[ci]
            del self._firsts[ci]
        elif i == 0:
            self._firsts[ci] = chunk.vs[0]
        self._count -= 1
        self._mapped -= e.length
        return e

    def _replace_raw(self, old_vstart: int, e: Extent) -> None:
        self._delete_raw(old_vstart)
        self._insert_raw(e)

    def _neighbours(self, start: int, end: int) -> tuple[Extent | None, Extent | None]:
        """(the extent before start, the one after) if [start, end) is a gap; raise otherwise."""
        ci, i = self._locate(start)
        left = self._chunks[ci].get(i) if ci >= 0 else None
        if left is not None and left.vend > start:
            raise ExtentError(f"range {start}+{end - start} is already mapped")
        nci, ni = self._next(ci, i)
        right = self._chunks[nci].get(ni) if nci >= 0 else None
        if right is not None and right.vstart < end:
            raise ExtentError(f"range {start}+{end - start} is already mapped")
        return left, right

    def is_gap(self, start: int, end: int) -> bool:
        try:
            self._neighbours(start, end)
        except ExtentError:
            return False
        return True

    def insert(self, vstart: int, length: int, lun: int, offset: int, flags: int = 0) -> None:
        """Map [vstart, vstart+length), which must be a gap, merging with neighbours."""
        if length <= 0 or vstart < 0 or offset < 0 or lun < 0:
            raise ExtentError(f"bad extent {vstart}+{length} -> {lun}:{offset}")
        if flags & ZERO:
            raise ExtentError("a stored extent cannot be zero")
        left, right = self._neighbours(vstart, vstart + length)
        e = Extent(vstart, length, lun, offset, flags)
        if left is not None and _mergeable(left, e):
            self._delete_raw(left.vstart)
            e = Extent(left.vstart, left.length + length, lun, left.offset, flags)
        if right is not None and _mergeable(e, right):
            self._delete_raw(right.vstart)
            e = Extent(e.vstart, e.length + right.length, lun, e.offset, flags)
        self._insert_raw(e)

    def split_at(self, pos: int) -> None:
        """Make pos an extent boundary (no-op in a gap or at a boundary)."""
        e = self.find(pos)
        if e is None or e.vstart == pos:
            return
        head = pos - e.vstart
        self._replace_raw(e.vstart, Extent(e.vstart, head, e.lun, e.offset, e.flags))
        self._insert_raw(Extent(pos, e.length - head, e.lun, e.offset + head, e.flags))

    def remove_range(self, start: int, end: int) -> list[Extent]:
        """Unmap [start, end); return the removed pieces (for freeing)."""
        self.split_at(start)
        self.split_at(end)
        removed = list(self.stored_in(start, end))
        for e in removed:
            self._delete_raw(e.vstart)
        return removed

    def set_flags(self, start: int, end: int, set_bits: int, clear_bits: int = 0) -> int:
        """Change state bits of the stored extents in [start, end); return how many changed."""
        if (set_bits | clear_bits) & ZERO:
            raise ExtentError("zero is not a stored state")
        self.split_at(start)
        self.split_at(end)
        changed = 0
        for e in list(self.stored_in(start, end)):
            nf = (e.flags | set_bits) & ~clear_bits
            if nf != e.flags:
                self._delete_raw(e.vstart)
                self._insert_raw(e._replace(flags=nf))
                changed += 1
        self.coalesce(start, end)
        return changed

    def coalesce(self, start: int, end: int) -> None:
        """Merge mergeable neighbours around [start, end)."""
        prev: Extent | None = self.find(start - 1) if start > 0 else None
        for e in list(self.stored_in(start, end + 1)):
            if prev is not None and prev.vstart != e.vstart and _mergeable(prev, e):
                self._delete_raw(e.vstart)
                merged = Extent(prev.vstart, prev.length + e.length, prev.lun, prev.offset,
                                prev.flags)
                self._replace_raw(prev.vstart, merged)
                prev = merged
            else:
                prev = e

    # ------------------------------------------------------------ persistence
    def to_wire(self) -> list[bytes]:
        """Five packed arrays (vstart, length, lun, offset, flags) in vstart order."""
        cols = [array("q"), array("q"), array("q"), array("q"), array("B")]
        for c in self._chunks:
            cols[0].extend(c.vs)
            cols[1].extend(c.ln)
            cols[2].extend(array("q", c.lu))
            cols[3].extend(c.of)
            cols[4].extend(c.fl)
        return [col.tobytes() for col in cols]

    @classmethod
    def from_wire(cls, cols: list[bytes]) -> ExtentMap:
        if not isinstance(cols, list) or len(cols) != 5:
            raise ExtentError("extent map needs five columns")
        arrs = [array("q"), array("q"), array("q"), array("q"), array("B")]
        for a, raw in zip(arrs, cols, strict=True):
            if not isinstance(raw, bytes) or len(raw) % a.itemsize:
                raise ExtentError("extent column has a bad size")
            a.frombytes(raw)
        n = len(arrs[0])
        if any(len(a) != n for a in arrs):
            raise ExtentError("extent columns differ in length")
        m = cls()
        prev_end = 0
        for k in range(0, n, _CHUNK):
            c = _Chunk()
            c.vs = arrs[0][k : k + _CHUNK]
            c.ln = arrs[1][k : k + _CHUNK]
            c.lu = array("l", arrs[2][k : k + _CHUNK])
            c.of = arrs[3][k : k + _CHUNK]
            c.fl = arrs[4][k : k + _CHUNK]
            for vs, ln in zip(c.vs, c.ln, strict=True):
                if vs < prev_end or ln <= 0:
                    raise ExtentError(f"extent at {vs} overlaps or is empty")
                prev_end = vs + ln
                m._mapped += ln
            m._chunks.append(c)
            m._firsts.append(c.vs[0])
        m._count = n
        return m
