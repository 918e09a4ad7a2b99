"""One segment's move, as pure logic: what agents see, what a write or the copier
must copy first, when the move may commit (docs/movement.md).

A segment being moved is a stored extent flagged MOVING (its location L1) with
an ``Alt`` (tables.py): the alternate location L2 and a bitmap, one bit per
4 KiB block, set when that block's current data is at L2. The bitmap never
reaches an agent: agents get entries, split as finely as the bitmap requires:

- marked blocks: entries at L2, ``nowrite`` (reads go to L2, where the data is;
  a write faults), except in the answer to a write fault for the blocks it
  writes: those come plainly writable, after every other agent that has the
  disk open got them at L2 (drained, acknowledged). So a block is only ever
  written at L2 while no agent can still read it at L1;
- unmarked blocks: ``nowrite`` entries at L1, so reads go straight to L1 and
  never wait, and a write faults, so the controller copies those blocks to L2
  and marks them before the write lands at L2.

Nothing here does I/O or imports trio; the service (service/movement.py) and
the job runner (service/jobs.py) act on these plans.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .extents import MOVING, NOWRITE, Extent
from .protocol import BLOCK_SIZE
from .tables import Alt, Disk

# what the copier copies and marks in one step: 4 MiB (a default segment). Each step ends
# in two flushes (the copy settled, the mark committed): 4 MiB steps moved an idle disk
# at 413 MiB/s against 293 with 1 MiB steps (bench movement, 5 of 6 runs faster)
COPY_CHUNK_BLOCKS = 1024


def agent_entries(e: Extent, a: Alt, start: int, end: int,
                  writable: tuple[int, int] | None = None) -> Iterator[Extent]:
    """The entries an agent gets for moving extent e (alternate a) within [start, end).

    Marked runs map to the alternate location, nowrite but inside writable (vstart
    bytes: published to every other agent, see the module's docstring); unmarked runs
    stay at e's location as nowrite entries. Other state bits of e (never MOVING) are
    kept.
    """
    lo, hi = max(start, e.vstart), min(end, e.vend)
    flags = e.flags & ~MOVING
    first = (lo - e.vstart) // BLOCK_SIZE
    last = -(-(hi - e.vstart) // BLOCK_SIZE)
    for b, n, marked in a.bitmap.runs(first, last):
        vs = max(lo, e.vstart + b * BLOCK_SIZE)
        ve = min(hi, e.vstart + (b + n) * BLOCK_SIZE)
        rel = vs - e.vstart
        if not marked:
            yield Extent(vs, ve - vs, e.lun, e.offset + rel, flags | NOWRITE)
            continue
        wlo, whi = writable if writable is not None else (ve, ve)
        for plo, phi, w in ((vs, max(vs, min(ve, wlo)), False),
                            (max(vs, wlo), min(ve, whi), True),
                            (max(vs, min(ve, whi)), ve, False)):
            if phi > plo:
                yield Extent(plo, phi - plo, a.lun, a.offset + (plo - e.vstart),
                             flags if w else flags | NOWRITE)


def expand(d: Disk, entries: Iterator[Extent],
           writable: tuple[int, int] | None = None) -> Iterator[Extent]:
    """Entries of d (from ExtentMap.entries) with moving extents split per block run;
    marked blocks inside writable come writable (agent_entries)."""
    for e in entries:
        if e.flags & MOVING:
            stored = d.extents.find(e.vstart)
            assert stored is not None and stored.flags & MOVING
            a = d.alts[stored.vstart]
            yield from agent_entries(stored, a, e.vstart, e.vend, writable)
        else:
            yield e


def blocks_of(e: Extent, start: int, end: int) -> tuple[int, int]:
    """Blocks [first, last) of moving extent e that bytes [start, end) touch."""
    lo, hi = max(start, e.vstart), min(end, e.vend)
    return (lo - e.vstart) // BLOCK_SIZE, -(-(hi - e.vstart) // BLOCK_SIZE)


def unmarked_runs(a: Alt, first: int, last: int) -> list[tuple[int, int]]:
    """Runs (first block, count) in [first, last) whose data is still only at L1: what
    must be copied to L2, and then marked, before a write there may land at L2."""
    return [(b, n) for b, n, marked in a.bitmap.runs(first, last) if not marked]


def next_copy(a: Alt, limit: int = COPY_CHUNK_BLOCKS) -> tuple[int, int] | None:
    """The copier's next step: the first unmarked run, at most limit blocks; None when
    every block is marked (the move may commit)."""
    for b, n, marked in a.bitmap.runs():
        if not marked:
            return b, min(n, limit)
    return None


@dataclass(frozen=True)
class Copy:
    """Bytes to copy from one location to another (container LUNs, byte offsets)."""

    src_lun: int
    src_offset: int
    dst_lun: int
    dst_offset: int
    length: int


def copies(e: Extent, a: Alt, runs: list[tuple[int, int]], back: bool = False) -> list[Copy]:
    """The copies for block runs of moving extent e: L1 -> L2, or L2 -> L1 if back
    (an abort returns marked blocks home). A short last block copies only its bytes
    inside the extent (the rest of the block is never read through the disk)."""
    out = []
    for b, n in runs:
        rel = b * BLOCK_SIZE
        length = min(n * BLOCK_SIZE, e.length - rel)
        if back:
            out.append(Copy(a.lun, a.offset + rel, e.lun, e.offset + rel, length))
        else:
            out.append(Copy(e.lun, e.offset + rel, a.lun, a.offset + rel, length))
    return out


def move_units(d: Disk, start: int, end: int, stay: int | None) -> Iterator[Extent]:
    """Stored, not moving, extent pieces of d in [start, end) to move, one per segment
    window (vstart // segment_size), skipping those already on LUN stay."""
    seg = d.segment_size
    for e in d.extents.stored_in(start, end):
        if e.flags & MOVING or e.lun == stay:
            continue
        pos = max(e.vstart, start)
        stop = min(e.vend, end)
        while pos < stop:
            nxt = min(stop, (pos // seg + 1) * seg)
            yield Extent(pos, nxt - pos, e.lun, e.offset + (pos - e.vstart), e.flags)
            pos = nxt
