"""Applying the move records to the State (docs/movement.md):
a segment gets an alternate location and a bitmap, blocks are marked there, and the
move commits or aborts. Pure; State.apply calls these through its handler table."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import records as R
from .bitmap import Bitmap
from .extents import MOVING, Extent
from .protocol import BLOCK_SIZE
from .tables import Alt, Disk, StateError, round_up

if TYPE_CHECKING:  # (state.py imports this module to build its handler table)
    from .state import State


def moving(d: Disk, vstart: int) -> tuple[Extent, Alt]:
    """The moving extent of d at vstart and its alternate location; StateError if none."""
    a = d.alts.get(vstart)
    e = d.extents.find(vstart) if a is not None else None
    if a is None or e is None or e.vstart != vstart or not e.flags & MOVING:
        raise StateError(f"disk {d.name!r} has no segment moving at {vstart!r}")
    return e, a

def move_start(s: State, rec: R.MoveStart) -> None:
    """Segment [vstart, vstart+length) of one stored extent gets an alternate location
    (lun, offset) with an empty bitmap; the extent is cut there and flagged MOVING."""
    d = s.disk(rec.name)
    vstart, length, lun, offset = rec.vstart, rec.length, rec.lun, rec.offset
    e = d.extents.find(vstart)
    if e is None or vstart + length > e.vend or length <= 0 or vstart % BLOCK_SIZE:
        raise StateError(f"move of {vstart}+{length} is not inside one extent of "
                         f"disk {d.name!r}")
    if e.flags & MOVING:
        raise StateError(f"disk {d.name!r} segment at {e.vstart} is already moving")
    if (vstart + length) % BLOCK_SIZE and vstart + length != d.size:
        raise StateError(f"move of {vstart}+{length} ends inside a block")
    c = s.luns.get(lun)
    nbytes = round_up(length)
    if c is None or offset % BLOCK_SIZE or not c.space.is_free(offset, nbytes):
        raise StateError(f"alternate {lun}:{offset}+{nbytes} is not free")
    c.space.take(offset, nbytes)
    d.extents.split_at(vstart)
    d.extents.split_at(vstart + length)
    d.extents.set_flags(vstart, vstart + length, MOVING)
    d.alts[vstart] = Alt(lun, offset, Bitmap(nbytes // BLOCK_SIZE))
    d.epoch += 1

def move_mark(s: State, rec: R.MoveMark) -> None:
    """Blocks (runs [[first, count], ...]) of a moving segment now have their data at
    its alternate location."""
    d = s.disk(rec.name)
    _e, a = moving(d, rec.vstart)
    runs = rec.runs
    for r in runs:
        if r[0] + r[1] > a.bitmap.nblocks:
            raise StateError(f"bad move.mark run {list(r)!r}")
    for first, count in runs:
        a.bitmap.set_range(first, count)
    # no epoch bump: a mark changes no entry an agent may hold (its nowrite L1
    # entries still read right; a write there faults) - else every agent would
    # reload its whole table once a heartbeat while a disk moves

def move_commit(s: State, rec: R.MoveCommit) -> None:
    """Every block is marked: the alternate location becomes the segment's location
    and the old one is freed; the extent may merge with its neighbours again."""
    d = s.disk(rec.name)
    e, a = moving(d, rec.vstart)
    if not a.bitmap.all_set():
        left = a.bitmap.nblocks - a.bitmap.count()
        raise StateError(f"disk {d.name!r} segment at {e.vstart}: {left} blocks are not "
                         "at the new location yet")
    _end_move(s, d, e, a, keep_alt=True)

def move_abort(s: State, rec: R.MoveAbort) -> None:
    """The move is dropped: the segment stays at its location (the controller has
    copied any block marked at the alternate location back first) and the alternate
    location is freed."""
    d = s.disk(rec.name)
    e, a = moving(d, rec.vstart)
    _end_move(s, d, e, a, keep_alt=False)

def _end_move(s: State, d: Disk, e: Extent, a: Alt, keep_alt: bool) -> None:
    nbytes = a.bitmap.nblocks * BLOCK_SIZE
    del d.alts[e.vstart]
    d.extents.remove_range(e.vstart, e.vend)
    if keep_alt:  # L1 is freed unless a snapshot or clone still maps it
        s.release_unshared(d.family, [e])
        d.extents.insert(e.vstart, e.length, a.lun, a.offset, e.flags & ~MOVING)
    else:
        s.luns[a.lun].space.release(a.offset, nbytes)
        d.extents.insert(e.vstart, e.length, e.lun, e.offset, e.flags & ~MOVING)
    d.extents.coalesce(e.vstart, e.vend)
    d.epoch += 1
