"""Relocating shared storage: storage a snapshot or clone maps moves whole
(docs/movement.md, "Relocating shared storage").

Shared storage is immutable (snapshots are read-only; a disk's or clone's write to a
shared block copies it first, under the disk's lock), so it needs none of the
fine-grained method's bitmaps. One unit (controller/jobplan.py: Unit), holding the
locks of every table of its family (no copy-on-write, snapshot removal or rollback
meanwhile):

1. plan new space on the destination and hold it reserved;
2. copy the bytes there, durably, in a worker thread (fault point ``relocate.copy``);
3. record ``storage.relocate`` (``relocate.record``): every table that maps the old
   place maps the new one, the new range is taken, the old one freed; the old range
   stays reserved (no plan may hand it out) until step 5;
4. once the record is durable, push the new entries to every agent that has one of
   those tables open, drained and acknowledged (``relocate.push``): none reads the old
   place afterwards;
5. punch the old range (``relocate.punch``) and drop its reservation.

A crash before 3 leaves the state as it was (the new space was only reserved): the job
plans the unit again. A crash after 3 leaves the unit relocated; the old range is free
(unpunched: new space is zeroed before use anyway) and the restarted controller waits
(``agents.wait_grace``) before any job step until every agent of the old incarnation
has reloaded its tables or lost its lease, so none still reads it when it is reused.
"""

from __future__ import annotations

import logging

from .. import faultpoints, state_relocate
from .. import protocol as P
from ..jobplan import Unit
from ..moves import Copy
from ..records_storage import StorageRelocate
from ..tables import StateError
from .coherence import Coherence
from .context import Context
from .movement import Movement
from .placement import Placement

log = logging.getLogger(__name__)


class Relocation:
    """Moves units of shared storage whole. Owns no state of its own: what is left to
    move is read off the tables (jobplan)."""

    def __init__(self, ctx: Context, placement: Placement, coherence: Coherence,
                 movement: Movement):
        self.ctx = ctx
        self.state = ctx.state
        self.journal = ctx.journal
        self.placement = placement
        self.coherence = coherence
        self.movement = movement

    def _space(self, u: Unit, dest: int | None) -> tuple[int, int, int]:
        """(lun, offset, length) of new space for (the head of) u: on dest, or on the
        container placement prefers for u's disk, never u's own; the largest
        contiguous piece up to u.length. RemoteError E_NO_SPACE, E_IO (failed)."""
        if dest is not None:
            cands = [self.state.luns[dest]]
        else:
            d = self.state.disks.get(u.owner)
            home = d.home if d is not None else None
            cands = [c for c in self.placement.candidates(None, home) if c.lun != u.lun]
        for c in cands:
            if c.failed:
                raise P.RemoteError(P.E_IO, f"container {c.name!r} is failed")
            sp = self.placement.plannable(c)
            if sp.free >= P.BLOCK_SIZE:
                off, n = sp.plan(min(u.length, sp.free))[0]
                n -= n % P.BLOCK_SIZE
                if n:
                    return c.lun, off, n
        raise P.RemoteError(P.E_NO_SPACE, f"no container has room for {u.owner!r}'s "
                            f"shared storage at {u.vstart}")

    async def relocate(self, u: Unit, dest: int | None) -> int:
        """Move (the head of) unit u to LUN dest (None: where placement prefers); the
        bytes moved, 0 if u cannot move now (a segment mapping it is being moved, or the
        tables changed: the caller plans again). Raises RemoteError E_NO_SPACE, E_IO."""
        async with self.ctx.dlocks(*self.state.family(u.family)):
            fam = self.state.family(u.family)
            users = state_relocate.mapping(fam, u.vstart, u.length, u.lun, u.offset)
            old = self.state.luns.get(u.lun)
            if (not users or old is None or not old.space.is_used(u.offset, u.length)
                    or not state_relocate.immutable(self.state, u.family, users, u.vstart,
                                                    u.length)):
                return 0
            lun, off, n = self._space(u, dest)
            rec = StorageRelocate(u.family, u.vstart, n, u.lun, u.offset, lun, off)
            with self.placement.reserved([(lun, off, n)]):
                await self.movement.copy([Copy(u.lun, u.offset, lun, off, n)])
                faultpoints.hit("relocate.copy")
                try:
                    state_relocate.check(self.state, rec)
                except StateError as e:  # a segment mapping it started moving meanwhile
                    log.info("relocation of %s at %d waits: %s", u.owner, u.vstart, e)
                    return 0
                faultpoints.hit("relocate.record")
                seq = self.ctx.record(rec)
            with self.placement.reserved([(u.lun, u.offset, n)]):  # freed, not yet punched
                await self.journal.wait_durable(seq)
                faultpoints.hit("relocate.push")
                fam = self.state.family(u.family)
                for t, _es in state_relocate.mapping(fam, u.vstart, n, lun, off):
                    await self.coherence.push_update(t, u.vstart, u.vstart + n, drain=True)
                faultpoints.hit("relocate.punch")
                await self.placement.release_space([(old.path, u.offset, n)])
        log.info("relocated %d bytes of %s's shared storage at %d: %d:%d -> %d:%d", n,
                 u.owner, u.vstart, u.lun, u.offset, lun, off)
        return n


__all__ = ["Relocation"]
