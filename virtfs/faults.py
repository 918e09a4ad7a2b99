"""Faults and lease waits: getting usable entries for an I/O that has none.

An entry the I/O may not use (zero or nowrite for a write, invalid, or any
entry but a hole once the lease has run out) is either waited out (only the
lease is missing: it comes back with the next heartbeat) or faulted to the
controller, which answers usable entries (allocating, copying on write,
preparing a moving segment as needed). Faults are coalesced per segment.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable

import trio

from controller.client import ConnectionLost
from controller.protocol import E_BUSY, ERROR, INVALID, NOWRITE, ZERO, RemoteError

from .agent import ControllerUnavailable, Session
from .errors import DiskError, remote_error
from .kernel import KernelCache
from .mapcache import Entry
from .metrics import AgentMetrics
from .opendisk import OpenDisk
from .tables import Tables, TableUpdate


class Faults:
    """Usable entries for I/O on open disks: lease waits and faults to the controller."""

    def __init__(self, session: Session, tables: Tables, kernel: KernelCache, *,
                 fault_timeout: float = 30.0, on_resize: Callable[[], None] = lambda: None):
        self.session = session
        self.tables = tables
        self.kernel = kernel
        self.fault_timeout = fault_timeout  # seconds an I/O waits for usable entries
        self.on_resize = on_resize  # allocation changed the pool's figures (listing stale)
        self.metrics: AgentMetrics | None = None  # virtfs-mount --metrics
        # disk key (inode) -> controller start -> the highest seq of a write fault's
        # answer ("sync"): its move.mark is not durable yet; the disk's next fsync makes
        # it so (owed_sync, disk.sync; docs/movement.md, "Durable at fsync")
        self.owed: dict[int, dict[int, int]] = {}

    async def fault(self, od: OpenDisk, offset: int, length: int, write: bool,
                    deadline: float) -> None:
        """Ask the controller for usable entries at [offset, offset+length) and install
        them; coalesced (per segment and kind: a fault waits for one in progress there).
        Returns early (the caller looks again) on E_BUSY before the deadline (trio
        clock). Raises DiskError, TableError."""
        key = (offset // od.segment_size, write)
        pending = od.faults.get(key)
        if pending is not None:
            with trio.move_on_at(deadline):
                await pending.wait()
            return
        ev = trio.Event()
        od.faults[key] = ev
        try:
            timeout = max(0.0, deadline - trio.current_time())
            try:
                r = await self.session.call("disk.fault", timeout=timeout, name=od.name,
                                            offset=offset, length=length, write=write)
            except (ControllerUnavailable, ConnectionLost) as e:
                raise DiskError(errno.EIO, f"fault on {od.name} at {offset}: {e}") from None
            except RemoteError as e:
                if e.code == E_BUSY and trio.current_time() < deadline:
                    await trio.sleep(0.05)  # a change on the range outlasted the fault: again
                    return
                raise remote_error(e, f"fault on {od.name} at {offset}") from None
            owe = r.get("sync")
            if owe:  # before the entries are used: the write they allow owes this seq
                boot, seq = int(owe[0]), int(owe[1])
                debts = self.owed.setdefault(od.inode, {})
                debts[boot] = max(debts.get(boot, 0), seq)
            u = TableUpdate.answer(r)
            before = od.table.allocated
            self.tables.apply_update(od.table, u)
            # entries newly allocated (not a size taken from an answer without rows)
            if write and u.start is not None and od.table.allocated != before:
                self.kernel.invalidate(od.inode, attr_only=True)  # st_blocks changed
                self.on_resize()  # and the pool's figures (df)
        finally:
            del od.faults[key]
            ev.set()

    async def owed_sync(self, od: OpenDisk) -> None:
        """The fsync of od's part at the controller: every write fault's record the
        disk owes (self.owed, taken now) made durable with its copies (``disk.sync``,
        one call per controller start). A record the controller lost (it restarted
        before making it durable) fails this fsync, and every later one of this disk at
        this agent: the writes it allowed may read back older (never claim more).
        DiskError(EIO)."""
        debts = dict(self.owed.get(od.inode, {}))
        for boot, seq in sorted(debts.items()):
            try:
                await self.session.call("disk.sync", timeout=self.fault_timeout,
                                        name=od.name, boot=boot, seq=seq)
            except (ControllerUnavailable, ConnectionLost) as e:
                raise DiskError(errno.EIO, f"fsync of {od.name}: {e}") from None
            except RemoteError as e:
                raise DiskError(errno.EIO, f"fsync of {od.name}: {e.message}") from None
            mine = self.owed.get(od.inode, {})
            if mine.get(boot, 0) <= seq:  # no later fault raised it meanwhile
                mine.pop(boot, None)
                if not mine:
                    self.owed.pop(od.inode, None)

    def usable(self, e: Entry, write: bool) -> bool:
        """Whether e may be used for this I/O now (its state, and the lease)."""
        if e.flags & INVALID:
            return False
        if write and e.flags & (ZERO | NOWRITE):
            return False
        if e.flags & ZERO:
            return True  # reading a hole needs no lease: nothing to go stale on disk
        return self.session.lease_valid()

    async def wait(self, od: OpenDisk, pos: int, length: int, write: bool,
                   deadline: float) -> None:
        """The entry at pos cannot be used: wait for the lease to be renewed if only it is
        missing, else fault [pos, pos+length) to the controller. DiskError(EIO) past
        the deadline (trio clock) or without a controller; TableError."""
        if trio.current_time() >= deadline:
            raise DiskError(errno.EIO, f"{od.name}: no usable entry at {pos} in time")
        e = od.table.pieces(pos, 1)[0]
        t0 = time.perf_counter()
        if not self.session.lease_valid() and self._usable_with_lease(e, write):
            # only the lease is missing: faulting would not help until it is renewed
            try:
                await self.session.wait_lease(deadline)
            except ControllerUnavailable as err:
                raise DiskError(errno.EIO, f"{od.name}: {err}") from None
            reason = "lease"
        else:
            await self.fault(od, pos, length, write, deadline)
            reason = self.reason(e, write)
        if self.metrics is not None:
            self.metrics.disk(od.name).fault(reason, time.perf_counter() - t0)

    @staticmethod
    def reason(e: Entry, write: bool) -> str:
        """Why e stopped an I/O, as metrics.FAULT_REASONS name it."""
        if e.flags & ERROR:
            return "error"
        if e.flags & INVALID:
            return "restricted"
        if write and e.flags & ZERO:
            return "allocate"
        return "nowrite"

    @staticmethod
    def _usable_with_lease(e: Entry, write: bool) -> bool:
        return not e.flags & INVALID and not (write and e.flags & (ZERO | NOWRITE))

    def deadline(self) -> float:
        """When an I/O starting now gives up waiting for usable entries (trio clock)."""
        return trio.current_time() + self.fault_timeout
