"""Allocation ahead, fallocate and discard: mapping and unmapping space of open disks.

A sequential writer on a thin disk that meets unallocated space allocates as far
ahead as it has written sequentially (disk.allocate: one round trip and one
record for many segments), and once its run is long, the next window in the
background too. fallocate preallocates (reserved) or punches holes; discard
gives whole segments back and zeroes the partial ends.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable

import trio

from controller.protocol import INVALID, ZERO

from .agent import Session
from .errors import DiskError, call
from .kernel import KernelCache
from .mapcache import Entry, TableError
from .opendisk import OpenDisk
from .sizes import Sizes
from .tables import Tables, TableUpdate

log = logging.getLogger(__name__)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
ALLOCATE_AHEAD_MAX = 256 << 20  # the most a sequential writer's fault allocates
PREFETCH_MIN_RUN = 64 << 20  # a run this long also allocates ahead in the background
ALLOCATE_CHUNK = 1 << 30  # bytes per disk.allocate call (controller's MAX_ALLOCATE)

# writes data at offset of a disk, leaving its zero entries alone and never growing it
ZeroFill = Callable[[OpenDisk, int, bytes], Awaitable[int]]


class Ahead:
    """Space of open disks mapped ahead of writers, preallocated, and given back."""

    def __init__(self, session: Session, tables: Tables, sizes: Sizes, kernel: KernelCache,
                 zero_fill: ZeroFill, *, fault_timeout: float = 30.0,
                 on_resize: Callable[[], None] = lambda: None):
        self.session = session
        self.tables = tables
        self.sizes = sizes
        self.kernel = kernel
        self.zero_fill = zero_fill  # the data path's write over what is not zero
        self.fault_timeout = fault_timeout  # seconds a background allocation may take
        self.on_resize = on_resize  # the pool's figures changed (listing stale)

    async def allocate_ahead(self, od: OpenDisk, e: Entry, pos: int, offset: int, end: int,
                             deadline: float) -> bool:
        """A write of [offset, end) cannot use entry e at pos: if e is unallocated space
        and the writer is sequential, map zero space from pos on, several segments in
        one controller call (one record), as far ahead as the writer has come
        sequentially. If the pool (or the disk's container) has less than that free,
        the controller maps what fits, down to the segments this write needs; only if
        not even those fit is it ENOSPC. Returns whether it did (the writer looks at
        the table again). DiskError, TableError."""
        if not (e.flags & ZERO and not e.flags & INVALID and self.session.lease_valid()
                and od.run.sequential(offset, end, od.segment_size)):
            return False
        seg = od.segment_size
        # as far ahead as the writer has come sequentially (so what a writer that stops
        # leaves allocated unwritten is less than what it wrote), at most the maximum
        ahead = max(min(od.run.length, ALLOCATE_AHEAD_MAX), seg)
        start = pos // seg * seg
        stop = min(max(end, start + ahead), od.table.size)
        await self.allocate(od, start, stop - start, reserve=False, deadline=deadline,
                            least=max(min(end, stop) - start, 1))
        return True

    def prefetch(self, od: OpenDisk, pos: int) -> None:
        """A sequential writer at pos on a thin disk: when the next unallocated space is
        less than half a window ahead, allocate the window in the background, so the
        writer need not wait for it (it still faults, and waits, if it gets there first).
        Never raises; a failure only logs (the writer's own fault reports the error)."""
        if (od.run.prefetching.running or od.run.length < PREFETCH_MIN_RUN
                or not od.run.sequential(pos, pos, od.segment_size)
                or not self.session.lease_valid()):
            return
        seg = od.segment_size
        ahead = min(od.run.length, ALLOCATE_AHEAD_MAX)
        hole = od.table.seek(pos, data=False)
        if hole is None or hole >= od.table.size or hole - pos > ahead // 2:
            return
        e = od.table.pieces(hole, 1)[0]
        if not e.flags & ZERO or e.flags & INVALID:
            return
        start = hole // seg * seg
        # never further than the run's length past the writer (as allocate_ahead)
        end = min((pos + ahead) // seg * seg, od.table.size)
        if end <= start:
            return
        length = end - start

        async def run() -> None:
            try:
                await self.allocate(od, start, length, reserve=False,
                                    deadline=trio.current_time() + self.fault_timeout,
                                    least=min(seg, length))
            except DiskError as err:
                log.debug("allocation ahead on %s at %d: %s", od.name, start, err)
            except TableError as err:
                log.warning("allocation ahead on %s at %d: %s", od.name, start, err)

        od.run.prefetching.start(self.session.start_soon, run)

    async def allocate(self, od: OpenDisk, offset: int, length: int, *, reserve: bool,
                       deadline: float | None = None, least: int | None = None) -> None:
        """Map every zero entry in [offset, offset+length) at the controller (reserve:
        also reserved in the container's file system, as fallocate promises), in calls
        of at most ALLOCATE_CHUNK bytes; apply the answers. least (bytes, allocation
        ahead; length at most ALLOCATE_CHUNK): the controller may map less, down to
        [offset, offset+least), if that is all there is room for. DiskError (ENOSPC...)."""
        end = min(offset + length, od.table.size)
        pos = offset
        while pos < end:
            n = min(end - pos, ALLOCATE_CHUNK)
            timeout = None if deadline is None else max(0.0, deadline - trio.current_time())
            extra = {} if least is None else {"least": min(least, n)}
            r = await call(self.session, "disk.allocate", f"allocate on {od.name} at {pos}",
                           timeout=timeout, name=od.name, offset=pos, length=n,
                           reserve=reserve, **extra)
            u = TableUpdate.answer(r)
            self.tables.apply_update(od.table, u)
            if u.start is not None:
                self.kernel.invalidate(od.inode, attr_only=True)  # st_blocks changed
                self.on_resize()
            if least is not None:
                return  # one call: the rest of the window was what there was no room for
            pos += n
            end = min(end, od.table.size)

    async def fallocate(self, od: OpenDisk, mode: int, offset: int, length: int) -> None:
        """fallocate(2) as ext4 takes it; COLLAPSE_RANGE, INSERT_RANGE, UNSHARE_RANGE and
        PUNCH_HOLE without KEEP_SIZE are EOPNOTSUPP. DiskError."""
        if offset < 0 or length <= 0:
            raise DiskError(errno.EINVAL)
        keep = bool(mode & FALLOC_FL_KEEP_SIZE)
        kind = mode & ~FALLOC_FL_KEEP_SIZE
        end = offset + length
        if kind == 0:  # preallocate: the size grows (without KEEP_SIZE), space is reserved
            if not keep and end > od.size:
                await self.sizes.trim(od)
                await self.sizes.grow(od, end)
                od.touch()  # the size changed (a preallocation inside changes nothing)
            await self.allocate(od, offset, min(end, od.size) - offset, reserve=True)
        elif kind == FALLOC_FL_PUNCH_HOLE and keep:
            await self.discard(od, offset, length)
            od.touch()
        elif kind == FALLOC_FL_ZERO_RANGE:
            await self.discard(od, offset, length)
            if not keep and end > od.size:
                await self.sizes.grow(od, end)
            od.touch()
        else:
            raise DiskError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x} is not supported")

    async def discard(self, od: OpenDisk, offset: int, length: int) -> None:
        """Punch a hole: whole segments go back to zero at the controller; the ends are zeroed."""
        end = min(offset + length, od.size)
        if offset >= end:
            return
        r = await call(self.session, "disk.discard", f"discard on {od.name}", name=od.name,
                       offset=offset, length=end - offset)
        u = TableUpdate.answer(r)
        self.tables.apply_update(od.table, u)
        if u.start is not None:
            self.kernel.invalidate(od.inode, attr_only=True)
            self.on_resize()  # the pool's figures (df)
        for lo, hi in r["zero"]:
            pos = lo
            while pos < hi:
                n = min(hi - pos, 1 << 20)
                await self.zero_fill(od, pos, bytes(n))
                pos += n
