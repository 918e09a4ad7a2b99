"""What a file in the mount needs beyond faults: allocation ahead of writes, the size an
appending writer grew ahead given back (disk.trim), times (disk.times), rm of an open
file (disk.unlink) and the close that then removes it (disk.close), or, if the last
agent that had it open dies instead, the reaper once that agent's lease has run out
(Files.reap_deleted).

``disk.allocate`` maps every zero entry of a range in one record (with the
write fault's step, ``Faults.map_zeros``): fallocate's preallocation (reserve:
the space is reserved in the container's own file system too, as a thick
disk's) and the agent's allocation ahead of a sequential writer on a thin disk
(several segments per round trip). Unlike a write fault it prepares no segment
being moved for a write (the agent does not write the range; a later write to
a moving segment faults as usual).
"""

from __future__ import annotations

import logging

import trio

from .. import protocol as P
from ..records import DiskRename, DiskTimes
from ..state import Disk, round_up
from .coherence import Coherence
from .context import Caller, Context
from .disks import Disks
from .faults import Faults

log = logging.getLogger(__name__)

MAX_ALLOCATE = 1 << 30  # bytes one disk.allocate may map (one record, one answer)


class Files:
    """What a file in the mount needs beyond faults (see the module's docstring)."""

    def __init__(self, ctx: Context, coherence: Coherence, faults: Faults, disks: Disks):
        self.ctx = ctx
        self.state = ctx.state
        self.journal = ctx.journal
        self.agents = ctx.agents
        self._record = ctx.record
        self.coherence = coherence
        self.faults = faults
        self.disks = disks

    async def disk_allocate(self, name: str, offset: int, length: int, reserve: bool,
                            conn: Caller, least: int | None = None) -> dict[str, object]:
        """Map every zero entry in [offset, offset+length) (segment-rounded, clipped to
        the disk), in one record; answer the range's entries like a fault.

        least (bytes, allocation ahead): map as much of the range as there is space
        for, from offset on in whole segments, but at least [offset, offset+least)
        (what the writer needs); E_NO_SPACE only if not even that fits. Without it
        (fallocate) the whole range is mapped or nothing."""
        self.ctx.agent(conn)
        d = self.ctx.live_disk(name)
        if d.is_snapshot:
            raise P.invalid(f"{name!r} is a snapshot: read-only")
        if offset < 0 or not 0 < length <= MAX_ALLOCATE or offset >= d.size:
            raise P.invalid(f"allocate range {offset}+{length} is outside disk {name!r} "
                            f"(size {d.size}) or longer than {MAX_ALLOCATE}")
        if least is not None and not 0 < least <= length:
            raise P.invalid(f"allocate least {least} is not in 1..{length} (the length)")
        await self.coherence.wait_unrestricted(d, name, offset, offset + length)
        seg = d.segment_size
        lo = offset // seg * seg
        async with self.ctx.dlock(d):
            if self.state.disks.get(d.name) is not d:
                raise P.not_found("disk", name)
            hi = min(round_up(offset + length, seg), d.size)
            hi = await self.faults.map_zeros(d, lo, hi, conn.agent, preallocate=reserve,
                                             least=None if least is None
                                             else offset + least - lo)
        hi = min(hi, d.size)
        return await self.coherence.answer(d, lo, hi)

    async def disk_trim(self, name: str, size: int, expect: int,
                        conn: Caller) -> dict[str, object]:
        """Give back what an agent grew ahead (virtfs/sizes.py, grow ahead): shrink the disk
        to size if its size is still expect (what that agent set); else change nothing
        (another writer or an admin set the size since) and answer without "update"."""
        d = self.ctx.live_disk(name)
        if d.is_snapshot:
            raise P.invalid(f"{name!r} is a snapshot: read-only")
        if not 0 <= size <= expect:
            raise P.invalid(f"trim of {name!r} to {size} (expecting {expect}) is not a shrink")
        if d.size != expect:
            return self.ctx.disk_info(d)
        return await self.disks.disk_resize(name, size, allow_shrink=True, conn=conn)

    async def disk_times(self, name: str, mtime: float, stime: float,
                         conn: Caller) -> dict[str, object]:
        """An agent's times of a disk (kept by it while the disk is written, sent on
        close, fsync and utimensat): one disk.times record; other agents are told the
        disk changed so they drop cached attributes."""
        d = self.ctx.live_disk(name)
        if d.is_snapshot:
            raise P.invalid(f"{name!r} is a snapshot: read-only")
        for t in (mtime, stime):
            if not 0 <= t < 1e11:
                raise P.invalid(f"time {t!r} is out of range")
        seq = self._record(DiskTimes(d.name, float(mtime), float(stime)))
        await self.journal.wait_durable(seq)
        await self.agents.notify({"push": "namespace", "changed": [d.name]},
                                 exclude=getattr(conn, "agent", None))
        return self.ctx.disk_info(d)

    async def disk_unlink(self, name: str, conn: Caller) -> dict[str, object]:
        """rm of a file an agent has open: the disk leaves its name at once (renamed to
        protocol.deleted_name, which no file name can be), so the name is free for a
        new file, as on ext4; it is removed when the last agent closes it (disk_close).
        A disk nobody has open is simply removed."""
        d = self.ctx.disk(name)
        if d.is_snapshot or P.former_name(name) is not None:
            raise P.invalid(f"{name!r} cannot be unlinked")
        if not self.agents.caching(d):
            return await self.disks.disk_rm(name, conn=conn)
        async with self.ctx.dlock(d):
            if self.state.disks.get(name) is not d:
                raise P.not_found("disk", name)
            n = 1
            while P.deleted_name(n, name) in self.state.disks:
                n += 1
            new = P.deleted_name(n, name)
            await self.journal.commit(DiskRename(name, new))
            await self.agents.push_all(self.agents.caching(d),
                                       {"push": "rename", "disk": name, "new": new,
                                        "handle": d.uid})
        await self.agents.notify({"push": "namespace", "removed": [name]})
        if not self.agents.caching(d):  # the last one closed meanwhile
            await self._remove_deleted(d)
        return self.ctx.disk_info(d)

    async def disk_close(self, name: str, handle: int | None, conn: Caller) -> None:
        """Count one open less: by handle (from disk.open), else by the disk's name now.
        An unlinked disk (disk_unlink) nobody has open any more then goes."""
        a = self.ctx.agent(conn)
        d = self.state.disks.get(name)
        if handle is not None:
            d = next((t for t in self.state.disks.values() if t.uid == handle), d)
        else:
            handle = next((uid for uid, ref in a.opens.items() if ref.disk.name == name), None)
        if handle is not None:
            self.agents.close(a, handle)
        if (d is not None and P.former_name(d.name) is not None
                and self.state.disks.get(d.name) is d and not self.agents.caching(d)):
            await self._remove_deleted(d)

    async def reap_deleted(self) -> None:
        """For the service's life: remove every unlinked disk (a deleted name, see
        disk_unlink) that no agent holding a lease has open. That is a disk whose last
        agent died, or was cut off, instead of closing it: it goes once that agent's
        lease (plus the registry's margin) has run out, as a file unlinked while open
        on ext4 goes when its last holder is gone. After a start, it waits out the
        previous run's agents' leases (AgentRegistry.grace_until) and one lease more,
        so that agents which re-register re-open their disks first. Checked every half
        lease (at least every 0.5 s); docs/architecture.md ("rm of an open file")."""
        every = max(0.5, self.agents.lease / 2)
        await trio.sleep_until(self.agents.grace_until + self.agents.lease)
        while True:
            for d in [d for d in self.state.disks.values()
                      if P.former_name(d.name) is not None]:
                if self.state.disks.get(d.name) is d and not self.agents.caching(d):
                    log.info("unlinked disk %r: no agent has it open any more; removing it",
                             d.name)
                    await self._remove_deleted(d)
            await trio.sleep(every)

    async def _remove_deleted(self, d: Disk) -> None:
        """Remove an unlinked disk nobody has open; if it cannot go (opened again, gone
        meanwhile, it has snapshots) it stays, listed as deleted, for `vdctl disk rm`."""
        try:
            await self.disks.disk_rm(d.name)
        except P.RemoteError as e:
            log.info("unlinked disk %r stays: %s", d.name, e.message)
