"""One segment's move, as pure logic: what agents see, what a write or the copier
must copy first, when the move may commit (docs/movement.md).

A segment being moved is a stored extent flagged MOVING (its location L1) with
an ``Alt`` (tables.py): the alternate location L2 and a bitmap, one bit per
4 KiB block, set when that block's current data is at L2. The bitmap never
reaches an agent: agents get entries, split as finely as the bitmap requires:

- marked blocks: entries at L2, ``nowrite`` (reads go to L2, where the data is;
  a write faults), except blocks *published*: in the answer to a write fault for
  the blocks it writes, and everywhere for blocks the copier pushed at L2 to
  every agent (drained, acknowledged) after marking them. Those come plainly
  writable: every agent that has the disk open got them at L2 first. So a block
  is only ever written at L2 while no agent can still read it at L1;
- unmarked blocks: ``nowrite`` entries at L1, so reads go straight to L1 and
  never wait, and a write faults, so the controller copies those blocks to L2
  and marks them before the write lands at L2.

Nothing here does I/O or imports trio; the service (service/movement.py) and
the job runner (service/jobs.py) act on these plans.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .bitmap import Bitmap
from .extents import MOVING, NOWRITE, Extent
from .protocol import BLOCK_SIZE
from .tables import Alt, Disk

# what the copier copies in one step, holding write faults on those blocks off: 1 MiB, so
# a write fault that meets a step waits for at most 1 MiB of copy, not a whole 4 MiB
# segment; the batch's one flush and one mark stay per batch. Measured (idle migration
# of 256 MiB, cold cache, 4 runs each, the 2-core VM at load 4-7): 256 KiB steps
# 89-170 MiB/s, 1 MiB 166-287, 4 MiB 165-224, 4 MiB before the copier's limits 189-287:
# smaller steps cost the copy more than they save a writer
COPY_CHUNK_BLOCKS = 256
# copier batches that copy and flush at once, controller-wide (service/copier.py): more
# moves (64 copies on write after 64 first writes) queue rather than flood the disk
COPY_CONCURRENT = 2
# what the copier makes durable with one flush, marks in one record and pushes to agents
# in one push: up to 64 MiB of one move (steps of COPY_CHUNK_BLOCKS), or what it copied
# in COPY_BATCH_SECONDS (a slow or rate-limited copy still publishes as it goes)
COPY_BATCH_BLOCKS = 16384
COPY_BATCH_SECONDS = 0.25


def agent_entries(e: Extent, a: Alt, start: int, end: int,
                  writable: tuple[int, int] | None = None,
                  published: Bitmap | None = None) -> Iterator[Extent]:
    """The entries an agent gets for moving extent e (alternate a) within [start, end).

    Marked runs map to the alternate location, nowrite but inside writable (vstart
    bytes: published to every other agent, see the module's docstring) and for the
    blocks set in published (a bitmap like a's: blocks every agent was told at L2, a
    subset of the marked ones); unmarked runs stay at e's location as nowrite entries.
    Other state bits of e (never MOVING) are kept.
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
        pieces = [(vs, ve, False)]
        if published is not None:
            pieces = [(max(vs, e.vstart + pb * BLOCK_SIZE),
                       min(ve, e.vstart + (pb + pn) * BLOCK_SIZE), pub)
                      for pb, pn, pub in published.runs(b, b + n)]
            tail = e.vstart + min(b + n, published.nblocks) * BLOCK_SIZE
            if tail < ve:  # (a bitmap shorter than a's: never published)
                pieces.append((max(vs, tail), ve, False))
        for pvs, pve, pub in pieces:
            if pve <= pvs:
                continue
            if pub:
                yield Extent(pvs, pve - pvs, a.lun, a.offset + (pvs - e.vstart), flags)
                continue
            wlo, whi = writable if writable is not None else (pve, pve)
            for plo, phi, w in ((pvs, max(pvs, min(pve, wlo)), False),
                                (max(pvs, wlo), min(pve, whi), True),
                                (max(pvs, min(pve, whi)), pve, False)):
                if phi > plo:
                    yield Extent(plo, phi - plo, a.lun, a.offset + (plo - e.vstart),
                                 flags if w else flags | NOWRITE)


def expand(d: Disk, entries: Iterator[Extent],
           writable: tuple[int, int] | None = None,
           published: Callable[[int, Alt], Bitmap | None] | None = None
           ) -> Iterator[Extent]:
    """Entries of d (from ExtentMap.entries) with moving extents split per block run;
    marked blocks inside writable, or published (published(vstart, alt): the move's
    published blocks, or None), come writable (agent_entries)."""
    for e in entries:
        if e.flags & MOVING:
            stored = d.extents.find(e.vstart)
            assert stored is not None and stored.flags & MOVING
            a = d.alts[stored.vstart]
            pub = published(stored.vstart, a) if published is not None else None
            yield from agent_entries(stored, a, e.vstart, e.vend, writable, pub)
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


def next_copy(a: Alt, limit: int = COPY_CHUNK_BLOCKS, start: int = 0
              ) -> tuple[int, int] | None:
    """The copier's next step: the first unmarked run from block start on, at most limit
    blocks; None when every block from start on is marked."""
    for b, n, marked in a.bitmap.runs(start):
        if not marked:
            return b, min(n, limit)
    return None


class MoveGone(Exception):
    """The segment is no longer moving (committed, aborted, discarded or removed)."""


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
