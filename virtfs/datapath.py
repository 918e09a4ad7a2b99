"""The data path: reads, writes and fsync of open disks through their tables.

Every read and write is translated through the open disk's cached table, in one
walk over its pieces shared by both (``DataPath._walk``, and ``_unblock`` where
it stops): valid entries go straight to the container, zero entries read as
zeros, entries that forbid the I/O (zero/nowrite for writes, invalid, or any
entry once the lease has run out) wait for the lease or fault to the controller
(faults.py), error entries fail with EIO at once.
DataPath builds and holds the other parts of the data path: the tables
(tables.py), faults (faults.py), sizes and times (sizes.py), allocation ahead,
fallocate and discard (ahead.py). Errors leave as DiskError(errno).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from bisect import bisect_right
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from controller import faultpoints
from controller.protocol import ERROR, INVALID, NOWRITE, ZERO

from .agent import Session
from .ahead import Ahead
from .blockio import ContainerError, ContainerIO
from .errors import DiskError
from .faults import Faults
from .kernel import KernelCache
from .mapcache import Entry
from .metrics import AgentMetrics
from .opendisk import OpenDisk
from .sizes import Sizes
from .tables import Tables

log = logging.getLogger(__name__)
T = TypeVar("T")
FAST_ENV = "VIRTFS_FASTPATH"  # "0": no fast path (tests cover both paths)
_NOT_READ = ZERO | INVALID | ERROR  # flags a fast read passes by (NOWRITE reads direct)
_NOT_WRITE = _NOT_READ | NOWRITE


def fast_path_wanted(option: bool = True) -> bool:
    """Whether the fast path serves plain reads and writes: the mount option (option),
    unless $VIRTFS_FASTPATH is "0" or a fault point is armed (fault points sit on the
    general path: a test that arms one means it to be hit)."""
    return (option and os.environ.get(FAST_ENV, "1") != "0"
            and not os.environ.get(faultpoints.ENV))


class DataPath:
    """I/O on open disks, and the parts it uses (tables, faults, sizes, ahead).

    fault_timeout: seconds an I/O waits for usable entries; on_resize: called when a
    disk's size, allocation or times changed at the controller (the listing is stale).
    """

    def __init__(self, session: Session, io: ContainerIO, kernel: KernelCache, *,
                 fault_timeout: float = 30.0, on_resize: Callable[[], None] = lambda: None):
        self.session = session
        self.io = io
        self.metrics: AgentMetrics | None = None
        self.fast = fast_path_wanted()  # DataPath.fast_read, fast_write (mount.py may clear)
        self.tables = Tables(session, io, kernel)
        self.faults = Faults(session, self.tables, kernel, fault_timeout=fault_timeout,
                             on_resize=on_resize)
        self.sizes = Sizes(session, self.tables, kernel, on_resize=on_resize)
        self.ahead = Ahead(session, self.tables, self.sizes, kernel,
                           lambda od, offset, data: self.write(od, offset, data, skip_zero=True),
                           fault_timeout=fault_timeout, on_resize=on_resize)

    def _walk(self, od: OpenDisk, pos: int, end: int, write: bool,
              visit: Callable[[Entry], None], skip_zero: bool = False
              ) -> tuple[int, Entry | None, bool]:
        """Visit the usable entries of [pos, end) (clipped to the table) in order, up
        to the first that cannot be used now (no await: the table holds still).

        visit(e) is called for each usable entry (a zero entry, read, needs no
        container; skip_zero passes over zero entries). Returns (the position
        reached, the entry there that stopped the walk or None if every piece was
        visited (the table may end before end), whether that entry is usable and
        only its container is not open yet). DiskError(EIO) at an error entry.
        """
        for e in od.table.pieces(pos, end - pos):
            if e.flags & ERROR:
                raise DiskError(errno.EIO, f"{od.name}: container failed at {e.vstart}")
            if skip_zero and e.flags & ZERO and not e.flags & INVALID:
                pos = e.vend
                continue
            if not self.faults.usable(e, write):
                return pos, e, False
            if not e.flags & ZERO and not self.io.is_open(e.lun):
                return pos, e, True
            visit(e)
            pos = e.vend
        return pos, None, False

    async def _unblock(self, od: OpenDisk, e: Entry, usable: bool, pos: int, end: int,
                       write: bool, deadline: float,
                       writer: tuple[int, int] | None = None) -> None:
        """Make entry e, which stopped a walk at pos, usable for the I/O of [pos, end):
        open its container (usable: only that was missing), or allocate ahead (writer:
        the whole write's [offset, end), a sequential writer on unallocated space), or
        wait for the lease or fault (deadline: trio clock). The caller then looks at
        the table again. DiskError, TableError."""
        if usable:
            await self._open(od, e)
        elif writer is None or not await self.ahead.allocate_ahead(od, e, pos, *writer,
                                                                   deadline):
            await self.faults.wait(od, pos, end - pos, write, deadline)

    # ------------------------------------------------------------ the fast path
    def plain(self, od: OpenDisk, offset: int, end: int, write: bool) -> tuple[int, int, int]:
        """The fast path's one table lookup: (fd, container offset, LUN) if [offset, end)
        (offset < end <= the disk's size) lies in one entry that this I/O may use
        without a fault (read: valid or nowrite; write: valid, and not held since a
        freeze, which makes it nowrite: DiskTable.fence), its container is open
        and buffered (not O_DIRECT), and the lease is valid; else (-1, 0, 0).

        Reads the live table (od.table), so every restriction, drain or lease loss
        already applied is seen (docs/fencing.md: no container I/O without a valid
        lease). Call it and do the I/O with no await in between. Never raises.
        """
        if not self.session.lease_valid():
            return -1, 0, 0
        t = od.table
        vs = t._vs
        i = bisect_right(vs, offset) - 1
        n = len(vs)
        if i < 0 or end > (vs[i + 1] if i + 1 < n else t.size):
            return -1, 0, 0
        if t._fl[i] & (_NOT_WRITE if write else _NOT_READ):
            return -1, 0, 0
        if write and t._gen[i] != t.gen:  # held since a freeze: nowrite (DiskTable.fence)
            return -1, 0, 0
        lun = t._lu[i]
        io = self.io
        fd = io._fds.get(lun, -1)
        if fd < 0 or lun in io._direct:
            return -1, 0, 0
        return fd, t._of[i] + offset - vs[i], lun

    def fast_read(self, od: OpenDisk, offset: int, length: int) -> bytes | None:
        """length bytes at offset through the fast path, or None: not a plain read (past
        the end, more than one entry, QoS, a fault or lease wait needed, a short or
        short read: the general path does it again). A failed read is logged, reported
        to the controller and raised as DiskError(EIO), as on the general path (_io)."""
        end = offset + length
        if od.qos is not None or end > od.size:
            return None
        fd, coff, lun = self.plain(od, offset, end, False)
        if fd < 0:
            return None
        m = self.metrics
        t0 = time.perf_counter() if m is not None else 0.0
        try:
            data = os.pread(fd, length, coff)
        except OSError as err:
            raise self._io_error(od, "read", lun, coff, err) from None
        if len(data) != length:
            return None
        if m is not None:
            m.disk(od.name).read(length, time.perf_counter() - t0)
        return data

    def fast_write(self, od: OpenDisk, offset: int, data: bytes) -> int | None:
        """Write data at offset through the fast path: len(data), or None if it is not a
        plain write (past the end, more than one entry, QoS, a fault, lease wait or
        growth needed). A failed write is logged, reported to the controller and raised
        as DiskError (ENOSPC, EDQUOT as they are, else EIO), as on the general path."""
        target = offset + len(data)
        if od.qos is not None or target > od.size or not data:
            return None
        fd, coff, lun = self.plain(od, offset, target, True)
        if fd < 0:
            return None
        m = self.metrics
        t0 = time.perf_counter() if m is not None else 0.0
        try:
            self.io.pwrite_fd(fd, lun, coff, data, od.inode)
        except OSError as err:
            raise self._io_error(od, "write", lun, coff, err) from None
        self._wrote(od, offset, target)
        if m is not None:
            m.disk(od.name).write(len(data), time.perf_counter() - t0)
        return len(data)

    def _wrote(self, od: OpenDisk, offset: int, target: int) -> None:
        """[offset, target) was written (not a discard's zeroing): the times, the run."""
        od.touch()
        if not od.times.timer.running:
            self.sizes.times_later(od)
        od.run.wrote(offset, target)
        self.ahead.prefetch(od, target)

    def set_metrics(self, metrics: AgentMetrics) -> None:
        """Count reads, writes and faults in metrics (virtfs-mount --metrics)."""
        self.metrics = self.faults.metrics = metrics

    async def read(self, od: OpenDisk, offset: int, length: int) -> bytes:
        """Up to length bytes at offset (short only at the end of the disk). DiskError."""
        if od.qos is not None:
            await od.qos.admit("read", length)
        if self.metrics is None:
            return await self._read(od, offset, length)
        t0 = time.perf_counter()
        data = await self._read(od, offset, length)
        self.metrics.disk(od.name).read(len(data), time.perf_counter() - t0)
        return data

    async def _read(self, od: OpenDisk, offset: int, length: int) -> bytes:
        end = min(offset + length, od.size)
        if offset >= end:
            return b""
        parts: list[bytes] = []

        def visit(e: Entry) -> None:
            parts.append(bytes(e.length) if e.flags & ZERO else
                         self._io(od, "read", e, self.io.pread, e.lun, e.offset, e.length))

        pos = offset
        deadline = self.faults.deadline()
        while pos < end:
            pos, e, usable = self._walk(od, pos, end, False, visit)
            if e is None:
                break  # (short if the disk shrank meanwhile: the end of file moved)
            await self._unblock(od, e, usable, pos, end, False, deadline)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def write(self, od: OpenDisk, offset: int, data: bytes | memoryview,
                    *, skip_zero: bool = False) -> int:
        """Write all of data at offset (growing the disk if the write passes its end).

        skip_zero (zeroing a discarded range): leave zero entries alone and never grow.
        Returns len(data); raises DiskError (EIO, ENOSPC, EFBIG). A write past the end
        that fails leaves the file's size as it was (when the end it set is still the
        file's: the step grown ahead at the controller is trimmed later as always).
        """
        size_before = od.size
        counted = self.metrics is not None and not skip_zero
        t0 = time.perf_counter() if counted else 0.0
        if od.qos is not None and not skip_zero:
            await od.qos.admit("write", len(data))
        try:
            n = await self._write(od, offset, data, skip_zero)
            if counted:
                assert self.metrics is not None
                self.metrics.disk(od.name).write(n, time.perf_counter() - t0)
            return n
        except DiskError:
            end = offset + len(data)
            if od.grow.eof is not None and od.grow.eof == end and end > size_before:
                od.grow.eof = size_before
                od.changed()
            raise

    async def _write(self, od: OpenDisk, offset: int, data: bytes | memoryview,
                     skip_zero: bool) -> int:
        view = memoryview(data)
        target = offset + len(view)

        def visit(e: Entry) -> None:
            # the debt is the disk's (its inode), not this handle's: an fsync on any
            # later handle of the disk pays it
            self._io(od, "write", e, self.io.pwrite, e.lun, e.offset,
                     view[e.vstart - offset : e.vend - offset], od.inode)

        pos = offset
        deadline = self.faults.deadline()
        while True:  # each pass, and each fault or open, re-checks the size first
            if skip_zero:
                target = min(target, od.size)
            elif od.size < target:
                # past the end, or the disk shrank under us: grow, like a regular file
                if trio.current_time() >= deadline:
                    raise DiskError(errno.EIO, f"{od.name}: cannot grow to {target}")
                await self.sizes.grow(od, target, ahead=True)
                continue
            if pos >= target:
                if skip_zero:
                    od.touch()
                    if not od.times.timer.running:
                        self.sizes.times_later(od)
                else:
                    self._wrote(od, offset, target)
                return len(view)
            pos, e, usable = self._walk(od, pos, target, True, visit, skip_zero)
            if e is not None:
                await self._unblock(od, e, usable, pos, target, True, deadline,
                                    None if skip_zero else (offset, target))

    def _io(self, od: OpenDisk, what: str, e: Entry, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on e's container, in flight over e's range (a drain waits for it).
        An OSError is logged, reported to the controller and raised as DiskError
        (ENOSPC, EDQUOT as they are, else EIO)."""
        op = od.inflight.begin(e.vstart, e.vend)
        try:
            return fn(*args)
        except OSError as err:
            raise self._io_error(od, what, e.lun, e.offset, err) from None
        finally:
            od.inflight.end(op)

    def _io_error(self, od: OpenDisk, what: str, lun: int, offset: int,
                  err: OSError) -> DiskError:
        """A container I/O of od's at (lun, offset) failed with err: logged, reported to
        the controller (io.error), and the DiskError for the caller (ENOSPC, EDQUOT as
        they are, else EIO)."""
        log.error("%s on %s (LUN %d offset %d) failed: %s", what, od.name, lun, offset, err)
        self._report(od, lun, offset, f"{what}: {err}")
        code = err.errno if err.errno in (errno.ENOSPC, errno.EDQUOT) else errno.EIO
        return DiskError(code, str(err))

    async def _open(self, od: OpenDisk, e: Entry) -> None:
        """Open e's container (in a worker thread); DiskError(EIO) if it cannot."""
        try:
            await self.io.open(e.lun)
        except OSError as err:
            log.error("%s: cannot use container LUN %d: %s", od.name, e.lun, err)
            self._report(od, e.lun, e.offset, f"open: {err}")
            raise DiskError(errno.EIO, str(err)) from None

    def _report(self, od: OpenDisk, lun: int, offset: int, message: str) -> None:
        """Tell the controller (io.error) about a failing container; in the background."""
        name = od.name

        async def send() -> None:
            try:
                await self.session.call("io.error", timeout=5.0, retry=False, name=name,
                                        lun=lun, offset=offset, message=message)
            except Exception as err:
                log.info("could not report the I/O error on %s to the controller: %s",
                         name, err)
        self.session.start_soon(send)

    async def fsync(self, od: OpenDisk) -> None:
        """Make every write to od durable, through whichever handle it came (fdatasync).

        Pays the disk's sync debts (blockio), then what its write faults owe at the
        controller (Faults.owed_sync). DiskError(EIO) if a container the disk wrote to
        failed a sync, now or since the agent started (reported to the controller), or
        the controller lost a write fault's record.
        """
        owed = bool(self.faults.owed.get(od.inode))
        try:
            await self.io.sync(od.inode)
        except ContainerError as e:
            self._report(od, e.lun, 0, f"fsync: {e.message}")
            raise DiskError(errno.EIO, f"fsync of {od.name}: {e.message}") from None
        except OSError as e:
            raise DiskError(errno.EIO, f"fsync of {od.name}: {e}") from None
        if owed:
            await self.faults.owed_sync(od)

    def seek(self, od: OpenDisk, offset: int, data: bool) -> int:
        """lseek SEEK_DATA/SEEK_HOLE from the table: zero entries are holes, every other
        entry (allocated, moving, restricted, failed) data. DiskError(ENXIO) at or past
        the end, or when no data follows (SEEK_DATA)."""
        size = od.size
        found = od.table.seek(offset, data) if offset < size else None
        if found is None or found >= size:
            if found is not None and not data:
                return size
            raise DiskError(errno.ENXIO)
        return found

