"""A disk's segment map: sorted, non-overlapping extents of differing sizes (pure).

Only mapped ranges are stored; a gap reads as an implicit ``zero`` entry
(thin, unallocated). Extents are kept in chunks of parallel ``array``s, so a
fully allocated 1 TiB thin disk at 4 MiB segments (262,144 extents) costs about
9 MiB and an insert moves at most one chunk. Adjacent extents that are
contiguous on the same container with the same state merge, up to
``MAX_EXTENT`` bytes, so a thick disk is a handful of entries.

``snapshot()`` freezes the map for a checkpoint in O(chunks): the snapshot
keeps references to the current chunks, and while it is open a mutation
copies a shared chunk before changing it (copy-on-write), so the snapshot can
be serialised later, in another thread, while the map keeps changing.
"""

from __future__ import annotations

import operator
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Sequence

# Entry states are bit flags (protocol.py); ZERO only appears on synthesised gap entries.
# (ERROR, INVALID, NOWRITE: for the importers that take the flags from here)
from .protocol import ERROR, INVALID, NO_LUN, NOWRITE, ZERO, Entry  # noqa: F401

MAX_EXTENT = 32 << 30
_CHUNK = 512
# A stored-only state bit (never sent to agents, who see rows per block instead):
# the extent is a segment being moved, with an alternate location and a block bitmap
# (state.Alt, keyed by its vstart). It never merges with a neighbour, so the key stays.
MOVING = 0x10


Extent = Entry  # a stored extent is a table entry


class ExtentError(ValueError):
    """An operation that would break the map's invariants."""


_LU_IS_Q = array("l").itemsize == array("q").itemsize  # LUN column stored as "l"


class _Chunk:
    __slots__ = ("vs", "ln", "lu", "of", "fl", "gen")

    def __init__(self, gen: int = 0) -> None:
        self.vs = array("q")
        self.ln = array("q")
        self.lu = array("l")
        self.of = array("q")
        self.fl = array("B")
        self.gen = gen  # the map generation that owns it (copy-on-write)

    def copy(self, gen: int) -> _Chunk:
        c = _Chunk(gen)
        c.vs, c.ln, c.lu, c.of, c.fl = self.vs[:], self.ln[:], self.lu[:], self.of[:], self.fl[:]
        return c

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
        other = _Chunk(self.gen)
        for name in ("vs", "ln", "lu", "of", "fl"):
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
        not a.flags & MOVING
        and a.vend == b.vstart
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
        # copy-on-write: while snapshots are open, chunks of an older generation
        # than _gen may be referenced by one and are copied before a change
        self._gen = 0
        self._open_snapshots = 0

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

    def stored_list(self, start: int, end: int) -> list[Extent]:
        """list(stored_in(start, end)), made a chunk slice at a time (C speed)."""
        out: list[Extent] = []
        if end <= start or not self._chunks:
            return out
        ci = max(bisect_right(self._firsts, start) - 1, 0)
        for c in self._chunks[ci:]:
            if c.vs[0] >= end:
                break
            a = max(bisect_right(c.vs, start) - 1, 0)
            b = bisect_left(c.vs, end)
            out.extend(map(Extent, c.vs[a:b], c.ln[a:b], c.lu[a:b], c.of[a:b], c.fl[a:b]))
        if out and out[0].vend <= start:
            del out[0]
        return out

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

    def columns(self, start: int, end: int) -> list[bytes]:
        """The stored extents overlapping [start, end), clipped to it, as five packed
        columns (vstart, length, lun, offset, flags: native int64 x 4, uint8), as
        to_wire gives them; gaps are left out. Copies whole chunk slices, so a
        fully allocated 1 TiB thin disk takes milliseconds, not a loop per extent.
        """
        cols: list[array[int]] = [array("q"), array("q"), array("q"), array("q"), array("B")]
        if end <= start or not self._chunks:
            return [col.tobytes() for col in cols]
        ci, i = self._locate(start)
        if ci < 0:
            ci, i = 0, 0
        elif self._chunks[ci].vs[i] + self._chunks[ci].ln[i] <= start:
            ci, i = self._next(ci, i)
        while 0 <= ci < len(self._chunks):
            c = self._chunks[ci]
            b = bisect_left(c.vs, end)  # extents of this chunk that start before end
            _extend_cols(cols, c, i, b)
            if b < len(c.vs):
                break
            ci, i = ci + 1, 0
        vs, ln, of = cols[0], cols[1], cols[3]
        if vs and vs[0] < start:  # clip the first and the last extent to the range
            cut = start - vs[0]
            vs[0], ln[0], of[0] = start, ln[0] - cut, of[0] + cut
        if vs and vs[-1] + ln[-1] > end:
            ln[-1] = end - vs[-1]
        return [col.tobytes() for col in cols]

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

    def _same(self, c: _Chunk) -> bool:
        """Whether this map stores exactly chunk c's extents over the range c spans
        (vstart, length, LUN, offset alike; flags aside)."""
        if not c.vs:
            return True
        cols = self.columns(c.vs[0], c.vs[-1] + c.ln[-1])
        lu = c.lu.tobytes() if _LU_IS_Q else array("q", c.lu).tobytes()
        return (cols[0] == c.vs.tobytes() and cols[1] == c.ln.tobytes() and cols[2] == lu
                and cols[3] == c.of.tobytes())

    def chunk_spans(self, held_by: Sequence[ExtentMap] = ()
                    ) -> Iterator[tuple[int, int, bool]]:
        """(start, end, held) for each chunk in order: the range its extents span
        (the first vstart, the last vend) and whether one of held_by maps exactly those
        extents there (the same chunk object, or equal columns: as batches())."""
        held = {id(c) for m in held_by for c in m._chunks}
        for c in self._chunks:
            if c.vs:
                yield (c.vs[0], c.vs[-1] + c.ln[-1],
                       id(c) in held or any(m._same(c) for m in held_by))

    def batches(self, max_extents: int, held_by: Sequence[ExtentMap] = ()
                ) -> Iterator[list[Extent]]:
        """The stored extents in vstart order, in lists of whole chunks of at least
        max_extents (the last may be shorter), leaving out every chunk whose extents
        one of held_by maps as they are (the same vstart, length, LUN and offset; flags
        aside): the same chunk object (shared since a clone() and changed by neither,
        docs/snapshots.md) in O(1), a copy of it compared column by column at C speed.

        Which chunks are left out is decided at the call, in O(chunks); the map must
        not change while the batches are read (hold its disk's lock).
        """
        held = {id(c) for m in held_by for c in m._chunks}
        own = [c for c in self._chunks
               if id(c) not in held and not any(m._same(c) for m in held_by)]
        batch: list[Extent] = []
        for c in own:
            batch.extend(map(Extent, c.vs, c.ln, c.lu, c.of, c.fl))
            if len(batch) >= max_extents:
                yield batch
                batch = []
        if batch:
            yield batch

    def own_spans(self, max_extents: int, held_by: Sequence[ExtentMap] = ()
                  ) -> list[tuple[int, int]]:
        """[(start, end)] (bytes, in order): ranges that together hold every stored
        extent of the chunks batches() does not leave out, and nothing of the chunks it
        does (neighbouring chunks of this map's own joined), each range holding whole
        chunks and at most max_extents extents unless one chunk has more. In
        O(chunks); what a range covers holds as long as the map does not change there.
        For removing a table in steps of bounded work (Snapshots.snap_rm)."""
        held = {id(c) for m in held_by for c in m._chunks}
        out: list[tuple[int, int]] = []
        cur: list[int] | None = None  # [start, end, extents] of the range being built
        for c in self._chunks:
            if not c.vs:
                continue
            if id(c) in held or any(m._same(c) for m in held_by):
                if cur is not None:
                    out.append((cur[0], cur[1]))
                    cur = None
                continue
            n, end = len(c.vs), c.vs[-1] + c.ln[-1]
            if cur is not None and cur[2] + n <= max_extents:
                cur[1], cur[2] = end, cur[2] + n
                continue
            if cur is not None:
                out.append((cur[0], cur[1]))
            cur = [c.vs[0], end, n]
        if cur is not None:
            out.append((cur[0], cur[1]))
        return out

    # ------------------------------------------------------------ mutation
    def _own(self, ci: int) -> _Chunk:
        """Chunk ci, copied first if an open snapshot may share it."""
        c = self._chunks[ci]
        if self._open_snapshots and c.gen != self._gen:
            c = c.copy(self._gen)
            self._chunks[ci] = c
        return c

    def _insert_raw(self, e: Extent) -> None:
        ci, i = self._locate(e.vstart)
        if ci < 0:
            if not self._chunks:
                self._chunks.append(_Chunk(self._gen))
                self._firsts.append(e.vstart)
            ci, i = 0, -1
        chunk = self._own(ci)
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
        e = self._chunks[ci].get(i)
        if e.vstart != vstart:
            raise ExtentError(f"no extent starts at {vstart}")
        chunk = self._own(ci)
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
    def clone(self) -> ExtentMap:
        """An independent copy in O(chunks) (a disk snapshot's or clone's table).

        Both maps share the current chunks and copy one before they change it, from
        now on (the same copy-on-write as snapshot(), kept for the maps' life).
        """
        self._gen += 1
        self._open_snapshots += 1  # never released: the clone may share any older chunk
        m = ExtentMap()
        m._chunks = list(self._chunks)
        m._firsts = list(self._firsts)
        m._count, m._mapped = self._count, self._mapped
        m._gen, m._open_snapshots = self._gen, 1
        return m

    def snapshot(self) -> ExtentSnapshot:
        """Freeze the current extents in O(chunks); release() it when done.

        Until released, every mutation of the map copies the (at most 2 x 512
        extent) chunk it changes first, so the snapshot stays as it was.
        """
        self._gen += 1
        self._open_snapshots += 1
        return ExtentSnapshot(self, list(self._chunks), self._count)

    def to_wire(self) -> list[bytes]:
        """Five packed arrays (vstart, length, lun, offset, flags) in vstart order."""
        cols = [array("q"), array("q"), array("q"), array("q"), array("B")]
        for c in self._chunks:
            _extend_cols(cols, c, 0, len(c.vs))
        return [col.tobytes() for col in cols]

    @classmethod
    def from_wire(cls, cols: list[bytes]) -> ExtentMap:
        """A map from to_wire()'s five columns; ExtentError if they are damaged."""
        m = cls()
        m.extend_wire(cols)
        return m

    def extend_wire(self, cols: list[bytes]) -> None:
        """Append extents given as five packed columns (as to_wire gives, or a slice
        of them) after the last stored one; for loading a checkpoint part by part.

        Raises ExtentError (and appends nothing) if the columns are malformed or the
        extents are empty, unordered, overlapping or start before the map's end.
        Adjacent extents are not merged: the map is restored exactly as written.
        """
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
        if not n:
            return
        vs, ln = arrs[0], arrs[1]
        prev_end = 0
        if self._chunks:
            last = self._chunks[-1]
            prev_end = last.vs[-1] + last.ln[-1]
        # C-speed checks (a Python loop costs seconds at tens of millions of extents)
        if min(ln) <= 0 or vs[0] < prev_end or not all(
                map(operator.le, map(operator.add, vs[:-1], ln[:-1]), vs[1:])):
            for v, n_ in zip(vs, ln, strict=True):  # find the culprit for the message
                if v < prev_end or n_ <= 0:
                    raise ExtentError(f"extent at {v} overlaps or is empty")
                prev_end = v + n_
            raise ExtentError("extents are out of order")  # not reached
        lu = arrs[2] if _LU_IS_Q else None
        for k in range(0, n, _CHUNK):
            c = _Chunk(self._gen)
            c.vs = vs[k : k + _CHUNK]
            c.ln = ln[k : k + _CHUNK]
            if lu is not None:
                c.lu = array("l", lu[k : k + _CHUNK].tobytes())
            else:
                c.lu = array("l", arrs[2][k : k + _CHUNK])
            c.of = arrs[3][k : k + _CHUNK]
            c.fl = arrs[4][k : k + _CHUNK]
            self._chunks.append(c)
            self._firsts.append(c.vs[0])
        self._count += n
        self._mapped += sum(ln)


def _extend_cols(cols: list[array[int]], c: _Chunk, a: int, b: int) -> None:
    """Append extents [a, b) of chunk c to the five wire columns."""
    cols[0].extend(c.vs[a:b])
    cols[1].extend(c.ln[a:b])
    if _LU_IS_Q:
        cols[2].frombytes(c.lu[a:b].tobytes())
    else:
        cols[2].extend(array("q", c.lu[a:b]))
    cols[3].extend(c.of[a:b])
    cols[4].extend(c.fl[a:b])


class ExtentSnapshot:
    """The extents of a map as they were at ExtentMap.snapshot().

    Reading it (parts()) touches only chunks the map no longer changes, so it
    may run in another thread while the map is mutated on the event loop.
    """

    def __init__(self, owner: ExtentMap, chunks: list[_Chunk], count: int):
        self._owner: ExtentMap | None = owner
        self._chunks = chunks
        self.count = count  # extents in the snapshot

    def parts(self, max_extents: int) -> Iterator[list[bytes]]:
        """The extents as five packed columns (as to_wire), cut into pieces of at most
        max_extents extents (>= 1) each; nothing for an empty map."""
        max_extents = max(1, max_extents)
        if max_extents >= _CHUNK:  # whole chunks when loaded back (extend_wire)
            max_extents -= max_extents % _CHUNK
        cols: list[array[int]] = [array("q"), array("q"), array("q"), array("q"), array("B")]
        have = 0
        for c in self._chunks:
            a, n = 0, len(c.vs)
            while a < n:
                b = min(n, a + max_extents - have)
                _extend_cols(cols, c, a, b)
                have += b - a
                a = b
                if have >= max_extents:
                    yield [col.tobytes() for col in cols]
                    cols = [array("q"), array("q"), array("q"), array("q"), array("B")]
                    have = 0
        if have:
            yield [col.tobytes() for col in cols]

    def release(self) -> None:
        """Stop sharing the chunks with the map (idempotent)."""
        if self._owner is not None:
            self._owner._open_snapshots -= 1
            self._owner = None
        self._chunks = []
