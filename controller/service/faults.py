"""An agent's tables: open, reload, close, and faults (allocation on first write)."""

from __future__ import annotations

from typing import Any

import trio

from .. import protocol as P
from ..extents import ZERO
from ..state import round_up
from .base import FAULT_WAIT
from .coherence import Coherence
from .placement import Placement


class FaultOps(Placement, Coherence):
    async def disk_open(self, name: str, conn: Any) -> dict[str, Any]:
        a = self._agent(conn)
        d = self._live_disk(name)
        a.opens[d.name] = a.opens.get(d.name, 0) + 1
        try:
            out = await self._answer(d, 0, d.size)
            self._live_disk(d.name)
        except BaseException:
            a.opens[d.name] -= 1
            if not a.opens[d.name]:
                del a.opens[d.name]
            raise
        return out

    async def disk_table(self, name: str, conn: Any) -> dict[str, Any]:
        """A fresh copy of a disk's table for an agent that already has it open."""
        self._agent(conn)
        d = self._live_disk(name)
        return await self._answer(d, 0, d.size)

    async def disk_close(self, name: str, conn: Any) -> None:
        a = self._agent(conn)
        n = a.opens.get(name, 0)
        if n <= 1:
            a.opens.pop(name, None)
        else:
            a.opens[name] = n - 1

    async def disk_fault(self, name: str, offset: int, length: int, write: bool,
                         conn: Any) -> dict[str, Any]:
        """An agent lacks a usable entry: allocate (writes to zero ranges) and answer entries."""
        self._agent(conn)
        d = self._live_disk(name)
        if offset < 0 or length <= 0 or offset >= d.size:
            raise P.invalid(f"fault range {offset}+{length} is outside disk {name!r} "
                            f"(size {d.size})")
        with trio.move_on_after(FAULT_WAIT):
            while self._is_restricted(d, offset, offset + length):
                await self._restriction_lifted.wait()
        if self._is_restricted(d, offset, offset + length):
            raise P.RemoteError(P.E_BUSY, f"{name!r} at {offset} is being changed; retry")
        seg = d.segment_size
        lo = offset // seg * seg
        if write:
            async with self._dlock(d):
                if self.state.disks.get(d.name) is not d:
                    raise P.not_found("disk", name)
                hi = min(round_up(offset + length, seg), d.size)
                gaps = [(e.vstart, e.length) for e in d.extents.entries(lo, hi)
                        if e.flags & ZERO]
                if gaps:
                    async with self._alloc_lock:
                        pieces = await self._plan_zeroed(gaps, d.pin, d.home)
                        seq = self._record({"op": "disk.map", "name": d.name, "map": pieces})
                    await self.journal.wait_durable(seq)
                    await self._push_update(d, lo, hi, exclude=conn.agent)
        hi = min(round_up(offset + length, seg), d.size)
        return await self._answer(d, lo, hi)
