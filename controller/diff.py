"""Changed-block tracking from the tables: which byte ranges differ between two tables
of one family (a snapshot and a later one, or the disk itself), without reading data.

Tables of a family share storage only by having been copied from one another
(snapshot, clone, rollback: docs/snapshots.md), so a byte of TO holds the same
data as in FROM when both map the same storage at the same vstart (same
container, same ``offset - vstart``), or when neither maps it (both read
zeros). Everything else is reported as changed: a write to shared storage is
copied on write first, so it always changes the mapping. The answer may
over-report (a segment rewritten with the same bytes, moved by a migration, or
being moved right now, counts as changed), never under-report. The cost is one
ordered walk of both maps, O(extents), like ``thin_delta`` over dm-thin's
mappings; no data is read.

Pure: no I/O, no trio.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

from .extents import MOVING, Extent


class Change(NamedTuple):
    """A byte range [offset, offset + length) whose data differs between FROM and TO.

    data: TO maps storage there (its bytes must be read); False: TO reads zeros there
    (unmapped), while FROM mapped something (rbd diff's "zero", not "data").
    """

    offset: int
    length: int
    data: bool

    @property
    def end(self) -> int:
        return self.offset + self.length

    def to_dict(self) -> dict[str, object]:
        """The JSON form, as ``rbd diff --format json`` gives it (offset, length,
        exists) plus the type's name ("data" or "zero")."""
        return {"offset": self.offset, "length": self.length, "exists": self.data,
                "type": "data" if self.data else "zero"}


def _same(a: Extent, b: Extent) -> bool:
    """Whether two extents that both cover a position map it to the same storage."""
    return (a.lun == b.lun and a.offset - a.vstart == b.offset - b.vstart
            and not (a.flags | b.flags) & MOVING)


def changes(old: Iterable[Extent], new: Iterable[Extent], start: int, end: int,
            limit: int | None = None) -> tuple[list[Change], int | None]:
    """The ranges of [start, end) whose data differs between old (FROM's stored extents)
    and new (TO's), in order; adjacent ranges of one kind merged.

    old, new: stored extents in vstart order, not overlapping, overlapping [start, end)
    or not (those outside are skipped), e.g. ``ExtentMap.stored_in(start, end)``; gaps
    read as zeros. end: TO's size (FROM's extents past it are ignored: the disk ends
    there). limit: at most this many changes (for paging); then the second value is
    where the next page starts, else None. Cost O(len(old) + len(new)), a step per
    extent, no data read: the reference walk (changes_cols is the controller's).
    """
    out: list[Change] = []
    a_it: Iterator[Extent] = iter(old)
    b_it: Iterator[Extent] = iter(new)
    a = next(a_it, None)
    b = next(b_it, None)
    pos = start
    # the range being gathered: [lo, hi) of kind kind (lo == hi: none)
    lo = hi = start
    kind = False
    while pos < end:
        while a is not None and a.vend <= pos:
            a = next(a_it, None)
        while b is not None and b.vend <= pos:
            b = next(b_it, None)
        in_a = a is not None and a.vstart <= pos
        in_b = b is not None and b.vstart <= pos
        nxt = end
        if a is not None:
            nxt = min(nxt, a.vend if in_a else a.vstart)
        if b is not None:
            nxt = min(nxt, b.vend if in_b else b.vstart)
        if in_a or in_b:
            same = in_a and in_b and a is not None and b is not None and _same(a, b)
            if not same:
                if hi == pos and kind == in_b and hi > lo:
                    hi = nxt
                else:
                    if hi > lo:
                        if limit is not None and len(out) >= limit:
                            return out, lo
                        out.append(Change(lo, hi - lo, kind))
                    lo, hi, kind = pos, nxt, in_b
        pos = nxt
    if hi > lo:
        if limit is not None and len(out) >= limit:
            return out, lo
        out.append(Change(lo, hi - lo, kind))
    return out, None


_NOT_MOVING = bytes(b for b in range(256) if not b & MOVING)


def _arrays(cols: Sequence[bytes]) -> list[array[int]]:
    out = [array("q"), array("q"), array("q"), array("q"), array("B")]
    for a, raw in zip(out, cols, strict=True):
        a.frombytes(raw)
    return out


def _records(cols: list[array[int]]) -> bytes:
    """Each extent's vstart, length, LUN and offset side by side (32 bytes a record):
    the four int64 columns interleaved (strided slice assignment, at C speed)."""
    n = len(cols[0])
    rec = array("q", bytes(32 * n))
    for k in range(4):
        rec[k::4] = cols[k]
    return rec.tobytes()


def _run(ra: bytes, rb: bytes, i: int, j: int, most: int) -> int:
    """How many records from ra's i-th and rb's j-th on (at most most) are identical:
    slices compared whole (memcmp), growing while they match; in the first slice
    that differs, the first differing byte is found from the XOR of the two slices
    as integers (lowest set bit). A run of k costs O(log k) comparisons."""
    k, n = 0, 16
    while k < most:
        n = min(n, most - k)
        a, b = (i + k) * 32, (j + k) * 32
        sa, sb = ra[a:a + 32 * n], rb[b:b + 32 * n]
        if sa == sb:
            k += n
            n = min(2 * n, 8192)
            continue
        x = int.from_bytes(sa, "little") ^ int.from_bytes(sb, "little")
        return k + ((x & -x).bit_length() - 1) // 256
    return k


def changes_cols(old: Sequence[bytes], new: Sequence[bytes], start: int, end: int,
                 limit: int | None = None) -> tuple[list[Change], int | None]:
    """changes() on the five packed columns of each table (``ExtentMap.columns(start,
    end)``: vstart, length, LUN, offset as int64, flags as uint8), the same answer,
    faster: where both tables hold identical extents one after another (the common case
    between two snapshots: the part that did not change), the run is skipped with
    comparisons of the packed records instead of a step per extent (unless either
    table has a segment being moved: then every extent is walked). limit and the second
    value as for changes()."""
    acols, bcols = _arrays(old), _arrays(new)
    avs, aln, alu, aof, afl = acols
    bvs, bln, blu, bof, bfl = bcols
    na, nb = len(avs), len(bvs)
    fast = not (old[4].translate(None, _NOT_MOVING) or new[4].translate(None, _NOT_MOVING))
    ra, rb = (_records(acols), _records(bcols)) if fast else (b"", b"")
    out: list[Change] = []
    i = j = 0
    pos = lo = hi = start  # the change being gathered: [lo, hi) of kind kind
    kind = False
    while pos < end:
        while i < na and avs[i] + aln[i] <= pos:
            i += 1
        while j < nb and bvs[j] + bln[j] <= pos:
            j += 1
        if (fast and i < na and j < nb and avs[i] == bvs[j] and aln[i] == bln[j]
                and alu[i] == blu[j] and aof[i] == bof[j]):
            k = _run(ra, rb, i, j, min(na - i, nb - j))
            i += k
            j += k
            pos = max(pos, avs[i - 1] + aln[i - 1])
            continue
        in_a = i < na and avs[i] <= pos
        in_b = j < nb and bvs[j] <= pos
        nxt = end
        if i < na:
            nxt = min(nxt, avs[i] + aln[i] if in_a else avs[i])
        if j < nb:
            nxt = min(nxt, bvs[j] + bln[j] if in_b else bvs[j])
        if (in_a or in_b) and not (
                in_a and in_b and alu[i] == blu[j] and aof[i] - avs[i] == bof[j] - bvs[j]
                and not (afl[i] | bfl[j]) & MOVING):
            if hi == pos and kind == in_b and hi > lo:
                hi = nxt
            else:
                if hi > lo:
                    if limit is not None and len(out) >= limit:
                        return out, lo
                    out.append(Change(lo, hi - lo, kind))
                lo, hi, kind = pos, nxt, in_b
        pos = nxt
    if hi > lo:
        if limit is not None and len(out) >= limit:
            return out, lo
        out.append(Change(lo, hi - lo, kind))
    return out, None


def join(chs: Iterable[Change]) -> Iterator[Change]:
    """chs (in order) with touching changes of one kind joined (pages put together)."""
    cur: Change | None = None
    for c in chs:
        if cur is not None and cur.end == c.offset and cur.data == c.data:
            cur = Change(cur.offset, cur.length + c.length, c.data)
            continue
        if cur is not None:
            yield cur
        cur = c
    if cur is not None:
        yield cur


def full(new: Iterable[Extent], start: int, end: int, limit: int | None = None
         ) -> tuple[list[Change], int | None]:
    """Every range of [start, end) of one table: what it maps as data, the gaps as
    zero (a full export: against an empty FROM, the gaps are stated too, so the
    result is exact whatever the target held before). limit, and the second value:
    as for changes (a data range may go on in the next page)."""
    out: list[Change] = []
    pos = start
    for e in new:
        lo, hi = max(e.vstart, start), min(e.vend, end)
        if hi <= lo:
            continue
        if out and out[-1].data and out[-1].end == lo:
            out[-1] = Change(out[-1].offset, hi - out[-1].offset, True)
            pos = hi
            continue
        if lo > pos:
            if limit is not None and len(out) >= limit:
                return out, pos
            out.append(Change(pos, lo - pos, False))
        if limit is not None and len(out) >= limit:
            return out, lo
        out.append(Change(lo, hi - lo, True))
        pos = hi
    if pos < end:
        if limit is not None and len(out) >= limit:
            return out, pos
        out.append(Change(pos, end - pos, False))
    return out, None


def changed_bytes(chs: Iterable[Change]) -> tuple[int, int]:
    """(bytes of data, bytes of zero) in chs."""
    data = zero = 0
    for c in chs:
        if c.data:
            data += c.length
        else:
            zero += c.length
    return data, zero


__all__ = ["Change", "changed_bytes", "changes", "changes_cols", "full", "join"]
