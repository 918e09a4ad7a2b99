"""Sizes and times of open disks: grow (ahead), trim, resize, settle; mtime and ctime.

A write past the end grows the disk at the controller by a large step and keeps
the file's end locally (grow ahead), given back by ``trim`` on fsync and close.
The times an agent changes are kept locally (OpenDisk.times) and sent with one
disk.times: on close, fsync, utimensat, and by a timer a while after a write.
``settle`` does both for close and fsync, retrying in the background without
the controller.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import Any

import trio

from controller.protocol import MAX_DISK_SIZE
from controller.units import human

from .agent import Session
from .errors import DiskError, call
from .kernel import KernelCache
from .opendisk import OpenDisk
from .tables import Tables, TableUpdate

log = logging.getLogger(__name__)

GROW_STEP_MIN = 16 << 20  # grow ahead: the smallest step (bytes past the write's end)
GROW_STEP_MAX = 1 << 30  # and the largest (steps grow with the file: half its size)
SETTLE_TIMEOUT = 5.0  # seconds close/fsync wait for the controller to take size and times
SETTLE_RETRIES = 600  # then once a second in the background, this many times
TIMES_INTERVAL = 5.0  # seconds between disk.times of a disk written without a close


class Sizes:
    """The sizes and times of open disks at the controller."""

    def __init__(self, session: Session, tables: Tables, kernel: KernelCache, *,
                 on_resize: Callable[[], None] = lambda: None):
        self.session = session
        self.tables = tables
        self.kernel = kernel
        self.on_resize = on_resize  # a disk's size or times changed (listing stale)

    async def grow(self, od: OpenDisk, size: int, ahead: bool = False) -> None:
        """Grow od to at least size bytes (never shrinks). DiskError (EFBIG, ENOSPC...).

        ahead (a write past the end): grow the disk at the controller by a large step
        and keep the file's end locally (od.grow.eof), so an appending writer makes one
        round trip per step, not per write; fsync and the last close trim it back.
        """
        if size > MAX_DISK_SIZE:
            raise DiskError(errno.EFBIG, f"{od.name}: {human(size)} is past the largest disk "
                            f"({human(MAX_DISK_SIZE)})")
        async with od.grow.lock:
            if size <= od.size:
                return
            if od.grow.eof is not None and od.table.size == od.grow.to and size <= od.table.size:
                od.grow.eof = size  # inside the step already taken: no round trip
                od.changed()
                return
            if ahead:
                base = od.size
                step = min(max(size - base, base // 2, GROW_STEP_MIN), GROW_STEP_MAX)
                want = min(size + step, MAX_DISK_SIZE)
                await self.resize(od.name, want, allow_shrink=False, od=od, grow_only=True)
                if od.table.size == want:  # we set it: the rest is ours to trim
                    od.grow.to, od.grow.eof = want, size
                else:  # another writer made it larger meanwhile: its size stands
                    od.grow.eof = None
                od.changed()
                return
            # grow_only: a disk another writer made larger meanwhile stays as it is
            await self.resize(od.name, size, allow_shrink=False, od=od, grow_only=True)

    async def settle(self, od: OpenDisk, times: bool = True) -> None:
        """trim and (times) save_times, for close and the last release (fsync: trim only;
        its times follow by the timer), which never fail or hold up their caller for
        long: without the controller (or if it does not answer within SETTLE_TIMEOUT)
        they are retried in the background until it is back."""
        if od.grow.eof is None and not (times and od.times.dirty):
            return
        if self.session.client is not None:
            try:
                await self.trim(od, timeout=SETTLE_TIMEOUT)
                if times:
                    await self.save_times(od, timeout=SETTLE_TIMEOUT)
                return
            except DiskError as e:
                log.info("%s: size and times not saved yet (%s); retrying in the background",
                         od.name, e)

        async def run() -> None:
            for _ in range(SETTLE_RETRIES):
                await trio.sleep(1.0)
                try:
                    await self.trim(od)
                    await self.save_times(od)
                    return
                except DiskError as e:
                    log.debug("%s: saving size and times: %s", od.name, e)
            log.warning("%s: gave up saving its size and times at the controller", od.name)

        od.settling.start(self.session.start_soon, run)

    def times_later(self, od: OpenDisk) -> None:
        """Send od's times TIMES_INTERVAL from now (armed by the first write after a
        send), so a disk written for long without a close has them at the controller
        too: at most one disk.times record per interval, never one per write."""

        async def run() -> None:
            while True:
                await trio.sleep(TIMES_INTERVAL)
                try:
                    await self.save_times(od, timeout=SETTLE_TIMEOUT)
                except DiskError as e:
                    log.debug("%s: saving times: %s", od.name, e)
                if not (od.times.dirty and od.handles > 0):
                    return  # else written meanwhile and still open: arm it again

        od.times.timer.start(self.session.start_soon, run)

    async def save_times(self, od: OpenDisk, timeout: float | None = None) -> None:
        """Send od's times to the controller if they changed since (close, fsync,
        utimensat): one disk.times record, never one per write. DiskError."""
        if not od.times.dirty:
            return
        od.times.dirty = False
        try:
            await call(self.session, "disk.times", f"times of {od.name}", timeout=timeout,
                       name=od.name, mtime=od.times.mtime, stime=od.times.stime)
        except BaseException:
            od.times.dirty = True
            raise
        self.on_resize()  # the listing's times are older

    async def trim(self, od: OpenDisk, timeout: float | None = None) -> None:
        """Give back what grow ahead took past the file's end (fsync, last close): the
        controller shrinks the disk to od.grow.eof if its size is still the one we set.
        DiskError (and od keeps its local end of file) if the controller cannot."""
        async with od.grow.lock:
            eof, grown = od.grow.eof, od.grow.to
            if eof is None or od.table.size != grown or eof >= grown:
                od.grow.eof, od.grow.to = None, -1
                od.changed()
                return
            r = await call(self.session, "disk.trim", f"trim {od.name}", timeout=timeout,
                           name=od.name, size=eof, expect=grown)
            od.grow.eof, od.grow.to = None, -1
            od.changed()
            self.on_resize()
            u = r.get("update")
            if u is not None:
                self.tables.apply_update(od.table, TableUpdate.ranged(u))
            elif od.table.size == grown:
                # another writer changed the size meanwhile: fetch the truth
                await self.tables.reload_or_restrict(od)
            self.kernel.invalidate(od.inode, attr_only=True)

    async def truncate(self, od: OpenDisk, size: int) -> None:
        """Set open disk od's size to exactly size bytes (truncate; shrinking allowed):
        nothing grown ahead stays. DiskError."""
        name = od.name  # as asked (a rename while the lock is taken does not change it)
        async with od.grow.lock:
            od.grow.eof, od.grow.to = None, -1
            od.changed()
            await self.resize(name, size, allow_shrink=True, od=od)

    async def resize(self, name: str, size: int, allow_shrink: bool,
                     od: OpenDisk | None = None, grow_only: bool = False) -> None:
        """Resize disk name to size bytes at the controller (grow_only: to at least size);
        apply the answer to od's table if open. Raises DiskError."""
        args: dict[str, Any] = {"grow_only": True} if grow_only else {}
        r = await call(self.session, "disk.resize", f"resize {name}", name=name, size=size,
                       allow_shrink=allow_shrink, **args)
        self.on_resize()
        if od is not None and r.get("update") is not None:
            u = TableUpdate.ranged(r["update"])
            self.tables.apply_update(od.table, u)
            short = od.table.size < size if grow_only else od.table.size != size
            if short and not od.table.stale(u.version):
                await self.tables.reload(od)
