"""Applying ``storage.relocate`` (controller/records_storage.py) to the State: storage
that tables of one family share moves whole, and every table that maps it is switched
in the same record (docs/movement.md, "Relocating shared storage"). Pure; State.apply
calls it through its handler table."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import records as R
from .extents import MOVING, Extent
from .protocol import BLOCK_SIZE
from .tables import Disk, StateError

if TYPE_CHECKING:  # (state.py imports this module to build its handler table)
    from .state import State


def mapping(tables: list[Disk], vstart: int, length: int, lun: int, offset: int
            ) -> list[tuple[Disk, list[Extent]]]:
    """(table, its stored extents, unclipped) of every table of tables that maps some of
    storage (lun, offset, length) at vstart (byte v at lun, offset + v - vstart)."""
    delta = offset - vstart
    out = []
    for t in tables:
        es = [e for e in t.extents.stored_in(vstart, vstart + length)
              if e.lun == lun and e.offset - e.vstart == delta]
        if es:
            out.append((t, es))
    return out


def check(s: State, rec: R.StorageRelocate) -> list[tuple[Disk, list[Extent]]]:
    """Whether rec fits the state; the tables it switches. StateError (naming the
    reason) if not: unaligned, unknown LUN, new range not free, old range not wholly
    allocated, nothing maps it, or a segment mapping it is being moved."""
    v, n, lun, off = rec.vstart, rec.length, rec.lun, rec.offset
    if n <= 0 or any(x % BLOCK_SIZE for x in (v, n, off, rec.new_offset)) or v < 0:
        raise StateError(f"storage.relocate of {lun}:{off}+{n} at {v} is not whole blocks")
    old, new = s.luns.get(lun), s.luns.get(rec.new_lun)
    if old is None or new is None:
        raise StateError(f"storage.relocate: unknown LUN {lun!r} or {rec.new_lun!r}")
    if not new.space.is_free(rec.new_offset, n):
        raise StateError(f"storage.relocate: {rec.new_lun}:{rec.new_offset}+{n} is not free")
    if not old.space.is_used(off, n):
        raise StateError(f"storage.relocate: {lun}:{off}+{n} is not wholly allocated")
    users = mapping(s.family(rec.family), v, n, lun, off)
    if not users:
        raise StateError(f"storage.relocate: no table of family {rec.family} maps "
                         f"{lun}:{off}+{n} at {v}")
    for t, es in users:
        for e in es:
            if e.flags & MOVING:
                raise StateError(f"storage.relocate: {t.name!r} is moving its segment at "
                                 f"{e.vstart}, which maps {lun}:{off}+{n}")
    return users


def storage_relocate(s: State, rec: R.StorageRelocate) -> None:
    """Every table of the family that maps the old storage maps the new one instead, at
    the same vstarts and with the same flags; the new range is taken and the old one
    freed (nothing maps it any more: tables share only at the same vstart)."""
    users = check(s, rec)  # nothing changes before here
    v, end, delta = rec.vstart, rec.vstart + rec.length, rec.new_offset - rec.vstart
    s.luns[rec.new_lun].space.take(rec.new_offset, rec.length)
    for t, _es in users:
        for pos in (v, end):  # cut extents of this storage that reach out of the range
            e = t.extents.find(pos)
            if e is not None and e.lun == rec.lun and e.offset - e.vstart == rec.offset - v:
                t.extents.split_at(pos)
        for e in mapping([t], v, rec.length, rec.lun, rec.offset)[0][1]:
            t.extents.remove_range(e.vstart, e.vend)
            t.extents.insert(e.vstart, e.length, rec.new_lun, e.vstart + delta, e.flags)
        t.extents.coalesce(v, end)
        t.epoch += 1
    s.luns[rec.lun].space.release(rec.offset, rec.length)


def immutable(s: State, fam: int, users: list[tuple[Disk, list[Extent]]], vstart: int,
              length: int) -> bool:
    """Whether no table may write the storage users map in [vstart, vstart + length):
    each writable table's part of it is mapped by another table of family fam too (a
    snapshot's storage is read-only; a disk's shared blocks are copied on write)."""
    for t, es in users:
        if t.is_snapshot:
            continue
        for e in es:
            lo, hi = max(e.vstart, vstart), min(e.vend, vstart + length)
            shared = s.referenced(fam, lo, hi, e.lun, e.offset + (lo - e.vstart), skip=t)
            covered = lo
            for a, b in shared:
                if a > covered:
                    return False
                covered = max(covered, b)
            if covered < hi:
                return False
    return True
