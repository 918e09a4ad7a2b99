"""An agent's tables: open and reload, and faults (allocation on first write).

``map_zeros`` is the one step that maps a range's zero entries for an agent:
a write fault and ``disk.allocate`` (service/files.py) both take it, and it
takes new space through placement's one path (``Placement.allocate``).
"""

from __future__ import annotations

from .. import faultpoints
from .. import protocol as P
from ..agents import Agent
from ..extents import ZERO
from ..recordbase import pieces_of
from ..records import DiskMap
from ..state import Disk, round_up
from .coherence import Coherence
from .context import Caller, Context
from .movement import Movement
from .placement import Placement
from .snapshots import Snapshots


class Faults:
    """An agent's tables and its faults."""

    def __init__(self, ctx: Context, placement: Placement, coherence: Coherence,
                 movement: Movement, snapshots: Snapshots, lazy_marks: bool = False):
        self.ctx = ctx
        # answer a write fault on a moving or shared segment before its copies and marks
        # are durable (virtfs-controller --lazy-marks; docs/movement.md, "Durable at
        # fsync"); off: they are made durable first, in a group commit shared with
        # other faults, and a controller crash never fails a writer's fsync
        self.lazy_marks = lazy_marks
        self.state = ctx.state
        self.journal = ctx.journal
        self.agents = ctx.agents
        self.placement = placement
        self.coherence = coherence
        self.movement = movement
        self.snapshots = snapshots

    async def disk_open(self, name: str, conn: Caller) -> dict[str, object]:
        """Count an open by the calling agent and answer the whole table.

        The answer's "name" is the disk's name when the answer was made (a rename may
        have overtaken the request) and "handle" its identity at this controller, which
        ``disk.close`` takes; both stay right across renames.
        """
        a = self.ctx.agent(conn)
        d = self.ctx.live_disk(name)
        self.agents.open(a, d)
        try:
            out = await self.coherence.answer(d, 0, d.size)
            self.ctx.live_disk(d.name)
        except BaseException:
            self.agents.close(a, d.uid)
            raise
        out["handle"] = d.uid
        return out

    async def disk_table(self, name: str, conn: Caller) -> dict[str, object]:
        """A fresh copy of a disk's table for an agent that already has it open."""
        self.ctx.agent(conn)
        d = self.ctx.live_disk(name)
        return await self.coherence.answer(d, 0, d.size)

    async def disk_fault(self, name: str, offset: int, length: int, write: bool,
                         conn: Caller) -> dict[str, object]:
        """An agent lacks a usable entry: allocate (writes to zero ranges) and answer entries."""
        self.ctx.agent(conn)
        d = self.ctx.live_disk(name)
        if offset < 0 or length <= 0 or offset >= d.size:
            raise P.invalid(f"fault range {offset}+{length} is outside disk {name!r} "
                            f"(size {d.size})")
        await self.coherence.wait_unrestricted(d, name, offset, offset + length, write)
        seg = d.segment_size
        lo = offset // seg * seg
        if write and d.is_snapshot:
            raise P.RemoteError(P.E_READONLY, f"{name!r} is a read-only snapshot")
        owed = 0  # the seq of a lazy move.mark this writer's next fsync must make durable
        while write:
            async with self.ctx.dlock(d):
                if self.state.disks.get(d.name) is not d:
                    raise P.not_found("disk", name)
                hi = min(round_up(offset + length, seg), d.size)
                await self.map_zeros(d, lo, hi, conn.agent)
                # storage a snapshot or clone shares: copy on write (a move to new space)
                await self.snapshots.copy_on_write(d, offset, min(offset + length, hi))
                # segments being moved: copy and mark the blocks this write touches
                # (durably; with lazy_marks written and recorded, not flushed: durable
                # at the writer's fsync)
                got = await self.movement.prepare_moving_write(
                    d, offset, min(offset + length, hi), exclude=conn.agent,
                    lazy=self.lazy_marks)
                if got is not None:
                    owed = got
                    break
            await self.movement.copying_done(d, offset, offset + length)  # the copier is there
        if not self.lazy_marks:
            owed = 0  # the marks are durable already: the writer's fsync owes nothing
        hi = min(round_up(offset + length, seg), d.size)
        # the written blocks of moving segments come writable: every other agent has
        # them at their new place now (pushed above); everything else as usual
        writable = (offset // P.BLOCK_SIZE * P.BLOCK_SIZE,
                    min(round_up(offset + length, P.BLOCK_SIZE), hi)) if write else None
        out = await self.coherence.answer(d, lo, hi, writable)
        if owed:
            out["sync"] = [self.state.boot, owed]  # disk.sync takes it at the next fsync
        return out

    async def disk_sync(self, name: str, boot: int, seq: int, conn: Caller) -> None:
        """Make record seq of controller start boot durable, with the copies it depends
        on (an agent's fsync after a write fault answered with "sync": [boot, seq];
        docs/movement.md, "Durable at fsync"). Returns once it is; RemoteError E_IO if
        it never will be: a record of the previous start that did not survive it (its
        seq is not below this start's "controller.boot" record), or of an older or
        unknown start (which this controller cannot tell apart: never claim more), or
        the journal stopped. name: the agent's disk, for messages only."""
        self.ctx.agent(conn)
        if boot == self.state.boot:
            if seq > self.state.seq:
                raise P.invalid(f"{name!r}: seq {seq} is past the journal's {self.state.seq}")
            try:
                await self.journal.wait_durable(seq)
            except RuntimeError as e:
                raise P.RemoteError(P.E_IO, f"{name!r}: the journal stopped: {e}") from None
            faultpoints.hit("faults.synced")
            return
        if boot == self.state.boot - 1 and 0 < seq < self.coherence.boot_seq:
            return  # the record survived the restart (recovered, so durable)
        raise P.RemoteError(P.E_IO, f"{name!r}: a write fault's record (start {boot}, seq "
                            f"{seq}) was lost in a controller restart; writes since may "
                            "be lost")

    async def map_zeros(self, d: Disk, lo: int, hi: int, exclude: Agent | None,
                        preallocate: bool = False, least: int | None = None) -> int:
        """Map every zero entry of d in [lo, hi) (bytes) in one disk.map record, durable,
        and push the new entries to every agent caching d but exclude (the caller, whose
        answer carries them). preallocate: reserve the space in the container's own file
        system too. least: map only as much of the range as fits, segment by segment
        from lo, but at least [lo, lo+least) (Placement.fitting_end). Returns the end of
        what is mapped now (hi unless least cut it). Hold d's lock. Raises RemoteError
        E_NO_SPACE (not even the part that must be mapped fits), E_IO, E_BUSY."""
        if least is not None:
            hi = self.placement.fitting_end(d, lo, hi, least)
        gaps = [(e.vstart, e.length) for e in d.extents.entries(lo, hi) if e.flags & ZERO]
        if gaps:
            seq = await self.placement.allocate(
                gaps, d.pin, d.home,
                lambda pieces: DiskMap(d.name, pieces_of(pieces)),
                preallocate=preallocate)
            await self.journal.wait_durable(seq)
            await self.coherence.push_update(d, lo, hi, exclude=exclude)
        return hi
