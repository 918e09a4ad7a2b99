"""An agent's tables: open, reload, close, and faults (allocation on first write)."""

from __future__ import annotations

from typing import Any

from .. import protocol as P
from ..extents import ZERO
from ..state import round_up
from .snapshots import SnapshotOps


class FaultOps(SnapshotOps):
    async def disk_open(self, name: str, conn: Any) -> dict[str, Any]:
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

    async def disk_table(self, name: str, conn: Any) -> dict[str, Any]:
        """A fresh copy of a disk's table for an agent that already has it open."""
        self.ctx.agent(conn)
        d = self.ctx.live_disk(name)
        return await self.coherence.answer(d, 0, d.size)

    async def disk_close(self, name: str, handle: int | None, conn: Any) -> None:
        """Count one open less: by handle (from disk.open), else by the disk's name now."""
        a = self.ctx.agent(conn)
        if handle is None:
            handle = next((uid for uid, ref in a.opens.items() if ref.disk.name == name), None)
        if handle is not None:
            self.agents.close(a, handle)

    async def disk_fault(self, name: str, offset: int, length: int, write: bool,
                         conn: Any) -> dict[str, Any]:
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
        while write:
            async with self.ctx.dlock(d):
                if self.state.disks.get(d.name) is not d:
                    raise P.not_found("disk", name)
                hi = min(round_up(offset + length, seg), d.size)
                gaps = [(e.vstart, e.length) for e in d.extents.entries(lo, hi)
                        if e.flags & ZERO]
                if gaps:
                    seq = await self.placement.allocate(
                        gaps, d.pin, d.home,
                        lambda pieces: {"op": "disk.map", "name": d.name, "map": pieces})
                    await self.journal.wait_durable(seq)
                    await self.coherence.push_update(d, lo, hi, exclude=conn.agent)
                # storage a snapshot or clone shares: copy on write (a move to new space)
                await self._copy_on_write(d, offset, min(offset + length, hi))
                # segments being moved: copy and mark the blocks this write touches
                if await self._prepare_moving_write(d, offset, min(offset + length, hi),
                                                    exclude=conn.agent):
                    break
            await self._copying_done(d, offset, offset + length)  # the copier is there
        hi = min(round_up(offset + length, seg), d.size)
        # the written blocks of moving segments come writable: every other agent has
        # them at their new place now (pushed above); everything else as usual
        writable = (offset // P.BLOCK_SIZE * P.BLOCK_SIZE,
                    min(round_up(offset + length, P.BLOCK_SIZE), hi)) if write else None
        return await self.coherence.answer(d, lo, hi, writable)
