"""Storage shared between the tables of one family (docs/snapshots.md).

A snapshot, a clone and a rollback copy a table, so the copies map the same
storage at the same vstart. A stored block is shared while another table of the
family maps it there, and freed only when the last one lets go: these functions
find the shared parts and free the rest. Pure: no I/O, no trio.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .extents import Extent
from .protocol import BLOCK_SIZE
from .tables import Container, Disk


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ranges [lo, hi) with the overlapping and touching ones merged."""
    ranges.sort()
    merged: list[tuple[int, int]] = []
    for lo, hi in ranges:
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def referenced(tables: Iterable[Disk], vstart: int, vend: int, lun: int,
               offset: int) -> list[tuple[int, int]]:
    """Parts [lo, hi) of [vstart, vend) whose storage (lun, offset + (v - vstart)) one
    of tables maps at the same vstart (byte offsets, sorted, merged)."""
    out: list[tuple[int, int]] = []
    delta = offset - vstart
    for t in tables:
        for e in t.extents.stored_in(vstart, vend):
            if e.lun == lun and e.offset - e.vstart == delta:
                out.append((max(e.vstart, vstart), min(e.vend, vend)))
    return _merge(out)


def referenced_all(tables: list[Disk], pieces: list[Extent]) -> list[list[tuple[int, int]]]:
    """referenced() for each of pieces (in vstart order, not overlapping), at once.

    A whole table's worth (a snapshot removed, a rollback) is one ordered walk of
    each of tables over the window the pieces span, not a lookup per piece: a 1 TiB
    table of 262,144 extents takes a fraction of a second instead of seconds, and a
    batch of pieces costs only its window.
    """
    if not tables or not pieces:
        return [[] for _ in pieces]
    if len(pieces) * 16 < sum(len(t.extents) for t in tables):
        return [referenced(tables, e.vstart, e.vend, e.lun, e.offset) for e in pieces]
    out: list[list[tuple[int, int]]] = [[] for _ in pieces]
    lo, hi = pieces[0].vstart, pieces[-1].vend
    for t in tables:
        ts = t.extents.stored_list(lo, hi)  # only the window pieces span
        if not ts:
            continue
        j = 0
        for i, p in enumerate(pieces):
            while j < len(ts) and ts[j].vend <= p.vstart:
                j += 1
            k = j
            delta = p.offset - p.vstart
            while k < len(ts) and ts[k].vstart < p.vend:
                e = ts[k]
                if e.lun == p.lun and e.offset - e.vstart == delta:
                    out[i].append((max(e.vstart, p.vstart), min(e.vend, p.vend)))
                k += 1
    for i, rs in enumerate(out):
        if len(rs) > 1:
            out[i] = _merge(rs)
    return out


def unshared_blocks(e: Extent, shared: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(offset, length) of e's storage, in whole blocks, outside shared (vstart ranges
    another table maps, from referenced): what freeing e gives back. A block any
    part of which is shared stays; e's short last block counts whole."""
    nblk = -(-e.length // BLOCK_SIZE)
    keep = [((lo - e.vstart) // BLOCK_SIZE, -(-(hi - e.vstart) // BLOCK_SIZE))
            for lo, hi in shared]
    out, pos = [], 0
    for kb, ke in [*keep, (nblk, nblk)]:
        if kb > pos:
            out.append((e.offset + pos * BLOCK_SIZE, (kb - pos) * BLOCK_SIZE))
        pos = max(pos, ke)
    return out


def release_unshared(tables: list[Disk], luns: Mapping[int, Container],
                     pieces: list[Extent]) -> None:
    """Free the storage of pieces (removed from their table already) that none of
    tables maps. Storage is freed a block at a time: a block any part of which
    another table maps stays (a table's short last block is still a whole block).
    Raises AllocError (the free lists unchanged for the LUN it met) on a range that
    is already free."""
    refs = referenced_all(tables, pieces)
    by_lun: dict[int, list[tuple[int, int]]] = {}
    for e, shared in zip(pieces, refs, strict=True):
        ranges = by_lun.setdefault(e.lun, [])
        if shared:
            ranges += unshared_blocks(e, shared)
        else:  # (unshared_blocks, without the walk)
            ranges.append((e.offset, -(-e.length // BLOCK_SIZE) * BLOCK_SIZE))
    for lun, ranges in by_lun.items():
        luns[lun].space.release_many(ranges)  # one merge, not an insert a range


def own_pieces(t: Disk, others: list[Disk]) -> list[Extent]:
    """t's stored extents, leaving out its extent chunks that one of others (t itself
    aside) holds as they are (ExtentMap.batches): everything there is mapped by that
    table at the same vstart, so nothing of it is t's alone. Freeing a whole table (a snapshot
    removed) then costs O(chunks) for what it still shares, O(extents) only for
    what changed since the copy."""
    held_by = [o.extents for o in others if o is not t]
    return [e for b in t.extents.batches(1 << 62, held_by) for e in b]
