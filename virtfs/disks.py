"""The agent's model: which disks exist, which are open, and the data path.

Every read and write is translated through the open disk's cached table:
valid entries go straight to the container, zero entries read as zeros,
entries that forbid the I/O (zero/nowrite for writes, invalid, or any entry
once the lease has run out) fault to the controller, error entries fail with
EIO at once. Errors leave this module as DiskError(errno); fuse_ops maps them.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from controller.client import Client, ConnectionLost
from controller.protocol import (
    E_BUSY,
    E_EXISTS,
    E_INVALID,
    E_NO_SPACE,
    E_NOT_FOUND,
    ERROR,
    INVALID,
    MAX_DISK_SIZE,
    NOWRITE,
    ZERO,
    RemoteError,
)

from .agent import ControllerUnavailable, Session
from .blockio import ContainerIO
from .mapcache import DiskTable, Entry, Inflight, TableError

log = logging.getLogger(__name__)
T = TypeVar("T")

LISTING_TTL = 1.0
STATFS_TTL = 2.0
ROOT_INODE = 1

_ERRNO = {E_NOT_FOUND: errno.ENOENT, E_EXISTS: errno.EEXIST, E_INVALID: errno.EINVAL,
          E_NO_SPACE: errno.ENOSPC, E_BUSY: errno.EBUSY}


async def _no_wait(inode: int) -> None:
    return None


class DiskError(Exception):
    def __init__(self, err: int, message: str = ""):
        super().__init__(message or errno.errorcode.get(err, str(err)))
        self.errno = err


def _remote(e: Exception, what: str) -> DiskError:
    if isinstance(e, RemoteError):
        return DiskError(_ERRNO.get(e.code, errno.EIO), f"{what}: {e.message}")
    return DiskError(errno.EIO, f"{what}: {e}")


@dataclass
class OpenDisk:
    name: str
    inode: int
    table: DiskTable
    segment_size: int
    handles: int = 0
    unlinked: bool = False
    inflight: Inflight = field(default_factory=Inflight)
    faults: dict[tuple[int, bool], trio.Event] = field(default_factory=dict)
    grow_lock: trio.Lock = field(default_factory=trio.Lock)
    used_luns: set[int] = field(default_factory=set)


@dataclass
class DiskInfo:
    name: str
    size: int
    allocated: int
    ctime: float


class Volumes:
    def __init__(self, session: Session, io: ContainerIO, *, fault_timeout: float = 30.0):
        self.session = session
        self.io = io
        self.fault_timeout = fault_timeout
        self.inodes: dict[int, str] = {}
        self.names: dict[str, int] = {}
        self._next_inode = ROOT_INODE + 1
        self.listing: dict[str, DiskInfo] = {}
        self._listing_at = -1e9
        self.open: dict[str, OpenDisk] = {}  # by current name
        self.by_inode: dict[int, OpenDisk] = {}
        self._statfs: tuple[float, dict[str, Any]] | None = None
        # the newest version stamp pushed per disk name, open or not (see _load)
        self._pushed_v: dict[str, int] = {}
        # set by the FUSE adapter: drop the kernel's cache of an inode's data/attrs
        self.invalidate: Callable[..., None] = lambda inode, attr_only=False: None
        self.invalidate_entry: Callable[[str], None] = lambda name: None
        self.invalidate_wait: Callable[[int], Awaitable[None]] = _no_wait
        session.on_push = self.handle_push
        session.on_reconnect = self.reload_all

    # ------------------------------------------------------------ calls
    async def _call(self, op: str, what: str, **args: Any) -> Any:
        try:
            return await self.session.call(op, **args)
        except (RemoteError, ControllerUnavailable) as e:
            raise _remote(e, what) from None

    # ------------------------------------------------------------ namespace
    def inode_of(self, name: str) -> int:
        ino = self.names.get(name)
        if ino is None:
            ino = self._next_inode
            self._next_inode += 1
            self.names[name] = ino
            self.inodes[ino] = name
        return ino

    async def refresh(self, force: bool = False) -> None:
        if not force and trio.current_time() - self._listing_at < LISTING_TTL:
            return
        rows = await self._call("disk.ls", "list disks")
        self.listing = {r["name"]: DiskInfo(r["name"], r["size"], r["allocated"], r["ctime"])
                        for r in rows}
        self._listing_at = trio.current_time()
        for name in list(self.names):
            if name not in self.listing and name not in self.open:
                self.inodes.pop(self.names.pop(name), None)

    async def lookup(self, name: str) -> int:
        od = self.open.get(name)
        if od is not None and od.unlinked:
            raise DiskError(errno.ENOENT)
        if od is None:
            await self.refresh(force=name not in self.listing)
            if name not in self.listing:
                raise DiskError(errno.ENOENT)
        return self.inode_of(name)

    async def info(self, inode: int) -> DiskInfo:
        od = self.by_inode.get(inode)
        if od is not None:
            base = self.listing.get(od.name)
            return DiskInfo(od.name, od.table.size, od.table.allocated,
                            base.ctime if base else 0.0)
        name = self.inodes.get(inode)
        if name is None:
            raise DiskError(errno.ENOENT)
        await self.refresh()
        info = self.listing.get(name)
        if info is None:
            raise DiskError(errno.ENOENT)
        return info

    async def listdir(self) -> list[tuple[str, int]]:
        await self.refresh()
        hidden = {n for n, od in self.open.items() if od.unlinked}
        names = sorted((set(self.listing) | set(self.open)) - hidden)
        return [(n, self.inode_of(n)) for n in names]

    async def statfs(self) -> dict[str, Any]:
        now = trio.current_time()
        if self._statfs is None or now - self._statfs[0] > STATFS_TTL:
            self._statfs = (now, await self._call("status", "statfs"))
        return self._statfs[1]

    # ------------------------------------------------------------ open / close
    def _load(self, od: OpenDisk | None, name: str, t: dict[str, Any]) -> DiskTable:
        """Install a whole table; one older than a push already seen only restricts."""
        self.io.set_paths({int(k): v for k, v in t["containers"].items()})
        v = t.get("v", 0)
        if od is None:
            table = DiskTable(name, t["size"], t["epoch"], t["rows"], v)
            if v < self._pushed_v.get(name, 0):
                # a push for this disk overtook the open's answer: trust nothing yet
                table.restrict(0, table.size)
            return table
        od.table.load(t["size"], t["epoch"], t["rows"], v)
        return od.table

    async def open_disk(self, inode: int) -> OpenDisk:
        name = self.inodes.get(inode)
        if name is None:
            raise DiskError(errno.ENOENT)
        od = self.open.get(name)
        if od is None:
            t = await self._call("disk.open", f"open {name}", name=name)
            od = self.open.get(name)  # another open may have raced us
            if od is None:
                od = OpenDisk(name, inode, self._load(None, name, t), t["segment_size"])
                self.open[name] = od
                self.by_inode[inode] = od
            else:
                await self._call("disk.close", f"close {name}", name=name)
        od.handles += 1
        return od

    async def release(self, od: OpenDisk) -> None:
        od.handles -= 1
        if od.handles > 0:
            return
        self._listing_at = -1e9  # the listing's sizes may be older than our table
        self.open.pop(od.name, None)
        self.by_inode.pop(od.inode, None)
        try:
            await self._call("disk.close", f"close {od.name}", name=od.name)
            if od.unlinked:
                await self._call("disk.rm", f"remove {od.name}", name=od.name)
        finally:
            if od.unlinked:
                self.inodes.pop(od.inode, None)

    async def reload_all(self, client: Client) -> None:
        """After reconnecting: a new registration, so re-open and reload every open disk."""
        for name, od in list(self.open.items()):
            try:
                t = await client.call("disk.open", name=name)
                self._load(od, name, t)
            except RemoteError as e:
                log.error("disk %s cannot be reopened after reconnecting: %s", name, e.message)
                od.table.restrict(0, od.table.size)
            self.invalidate(od.inode)

    async def _reload(self, od: OpenDisk) -> None:
        t = await self._call("disk.table", f"reload {od.name}", name=od.name)
        self._load(od, od.name, t)
        self.invalidate(od.inode)

    # ------------------------------------------------------------ pushes
    async def handle_push(self, msg: dict[str, Any]) -> None:
        kind = msg.get("push")
        if kind == "update":
            v = msg.get("v")
            if isinstance(v, int):
                name = msg["disk"]
                self._pushed_v[name] = max(self._pushed_v.get(name, 0), v)
            od = self.open.get(msg["disk"])
            if od is None:
                return
            start, end = msg["start"], msg["end"]
            try:
                od.table.replace(start, end, msg["rows"], size=msg["size"], epoch=msg["epoch"],
                                 version=msg.get("v"))
            except TableError as e:
                log.warning("bad update for %s (%s); reloading the table", od.name, e)
                od.table.restrict(0, od.table.size)
                await self._reload(od)
            if msg.get("drain"):
                await od.inflight.drain(start, end)
            self.invalidate(od.inode)
            info = self.listing.get(od.name)
            if info is not None:
                info.size = od.table.size
        elif kind == "rename":
            old, new = msg["disk"], msg["new"]
            ino = self.names.pop(old, None)
            if ino is not None:
                self.names[new] = ino
                self.inodes[ino] = new
            od = self.open.pop(old, None)
            if od is not None:
                od.name = new
                self.open[new] = od
            self._listing_at = -1e9
        elif kind == "namespace":
            self._listing_at = -1e9
            for name in msg.get("changed", []):
                ino = self.names.get(name)
                if ino is not None:  # e.g. a size set with vdctl: seen before we ack
                    await self.invalidate_wait(ino)
            for name in msg.get("removed", []):
                if name not in self.open:
                    self.invalidate_entry(name)
                    ino = self.names.pop(name, None)
                    if ino is not None:
                        self.inodes.pop(ino, None)
                    self.listing.pop(name, None)
        elif kind == "epochs":
            for name, epoch in msg["epochs"].items():
                od = self.open.get(name)
                if od is not None and epoch is None:
                    # the controller no longer has it: use none of its entries
                    od.table.restrict(0, od.table.size)
                    continue
                if od is not None and epoch != od.table.epoch:
                    log.info("disk %s: table epoch %d, controller has %d; reloading",
                             name, od.table.epoch, epoch)
                    try:
                        await self._reload(od)
                    except DiskError as e:
                        log.warning("reload of %s failed: %s", name, e)

    # ------------------------------------------------------------ faults
    async def _fault(self, od: OpenDisk, offset: int, length: int, write: bool,
                     deadline: float) -> None:
        """Ask the controller for usable entries at [offset, offset+length); coalesced."""
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
                raise _remote(e, f"fault on {od.name} at {offset}") from None
            self.io.set_paths({int(k): v for k, v in r["containers"].items()})
            rows = r["rows"]
            if not rows and r["size"] != od.table.size and not od.table.stale(r.get("v")):
                od.table.resize(r["size"])
            if rows:
                start = rows[0][0]
                end = rows[-1][0] + rows[-1][1]
                before = od.table.allocated if write else 0
                od.table.replace(start, end, rows, size=r["size"], epoch=r["epoch"],
                                 version=r.get("v"))
                if write and od.table.allocated != before:
                    self.invalidate(od.inode, attr_only=True)  # st_blocks changed
        finally:
            del od.faults[key]
            ev.set()

    def _usable(self, e: Entry, write: bool) -> bool:
        if e.flags & INVALID:
            return False
        if write and e.flags & (ZERO | NOWRITE):
            return False
        if e.flags & ZERO:
            return True  # reading a hole needs no lease: nothing to go stale on disk
        return self.session.lease_valid()

    async def _wait(self, od: OpenDisk, pos: int, length: int, write: bool,
                    deadline: float) -> None:
        """The entry at pos cannot be used: renew the lease, or fault to the controller."""
        if trio.current_time() >= deadline:
            raise DiskError(errno.EIO, f"{od.name}: no usable entry at {pos} in time")
        e = od.table.pieces(pos, 1)[0]
        if not self.session.lease_valid() and self._usable_with_lease(e, write):
            # only the lease is missing: faulting would not help until it is renewed
            try:
                await self.session.wait_lease(deadline)
            except ControllerUnavailable as err:
                raise DiskError(errno.EIO, f"{od.name}: {err}") from None
            return
        await self._fault(od, pos, length, write, deadline)

    @staticmethod
    def _usable_with_lease(e: Entry, write: bool) -> bool:
        return not e.flags & INVALID and not (write and e.flags & (ZERO | NOWRITE))

    def _deadline(self) -> float:
        return trio.current_time() + self.fault_timeout

    async def read(self, od: OpenDisk, offset: int, length: int) -> bytes:
        end = min(offset + length, od.table.size)
        if offset >= end:
            return b""
        parts: list[bytes] = []
        pos = offset
        deadline = self._deadline()
        while pos < end:
            pieces = od.table.pieces(pos, end - pos)
            if not pieces:
                break  # the disk shrank meanwhile: end of file moved
            for e in pieces:
                if e.flags & ERROR:
                    raise DiskError(errno.EIO, f"{od.name}: container failed at {e.vstart}")
                if not self._usable(e, write=False):
                    break
                if e.flags & ZERO:
                    parts.append(bytes(e.length))
                else:
                    op = od.inflight.begin(e.vstart, e.vend)
                    try:
                        parts.append(self._io(od, "read", e, self.io.pread, e.lun, e.offset,
                                              e.length))
                    finally:
                        od.inflight.end(op)
                pos = e.vend
            else:
                break
            await self._wait(od, pos, end - pos, False, deadline)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _io(self, od: OpenDisk, what: str, e: Entry, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except OSError as err:
            log.error("%s on %s (LUN %d offset %d) failed: %s", what, od.name, e.lun, e.offset,
                      err)
            self._report(od, e, f"{what}: {err}")
            code = err.errno if err.errno in (errno.ENOSPC, errno.EDQUOT) else errno.EIO
            raise DiskError(code, str(err)) from None

    def _report(self, od: OpenDisk, e: Entry, message: str) -> None:
        async def send() -> None:
            try:
                await self.session.call("io.error", timeout=5.0, retry=False, name=od.name,
                                        lun=e.lun, offset=e.offset, message=message)
            except Exception:
                pass
        self.session.start_soon(send)

    async def write(self, od: OpenDisk, offset: int, data: bytes | memoryview,
                    *, skip_zero: bool = False) -> int:
        """Write all of data at offset (growing the disk if the write passes its end).

        skip_zero (zeroing a discarded range): leave zero entries alone and never grow.
        """
        view = memoryview(data)
        target = offset + len(view)
        pos = offset
        deadline = self._deadline()
        while True:
            if skip_zero:
                target = min(target, od.table.size)
            elif od.table.size < target:
                # past the end, or the disk shrank under us: grow, like a regular file
                if trio.current_time() >= deadline:
                    raise DiskError(errno.EIO, f"{od.name}: cannot grow to {target}")
                await self.grow(od, target)
                continue
            if pos >= target:
                return len(view)
            for e in od.table.pieces(pos, target - pos):
                if e.flags & ERROR:
                    raise DiskError(errno.EIO, f"{od.name}: container failed at {e.vstart}")
                if skip_zero and e.flags & ZERO and not e.flags & INVALID:
                    pos = e.vend
                    continue
                if not self._usable(e, write=True):
                    break
                chunk = view[e.vstart - offset : e.vend - offset]
                op = od.inflight.begin(e.vstart, e.vend)
                try:
                    self._io(od, "write", e, self.io.pwrite, e.lun, e.offset, chunk)
                finally:
                    od.inflight.end(op)
                od.used_luns.add(e.lun)
                pos = e.vend
            else:
                continue  # all pieces done: re-check the size, then finish
            await self._wait(od, pos, target - pos, True, deadline)

    async def fsync(self, od: OpenDisk) -> None:
        try:
            await self.io.sync(od.used_luns)
        except OSError as e:
            raise DiskError(errno.EIO, f"fsync of {od.name}: {e}") from None

    async def grow(self, od: OpenDisk, size: int) -> None:
        if size > MAX_DISK_SIZE:
            raise DiskError(errno.EFBIG, f"{od.name}: {size} bytes is past the largest disk")
        async with od.grow_lock:
            if size > od.table.size:
                await self._resize(od.name, size, allow_shrink=False, od=od)

    async def _resize(self, name: str, size: int, allow_shrink: bool,
                      od: OpenDisk | None = None) -> None:
        r = await self._call("disk.resize", f"resize {name}", name=name, size=size,
                             allow_shrink=allow_shrink)
        self._listing_at = -1e9
        u = r.get("update")
        if od is not None and u is not None:
            od.table.replace(u["start"], u["end"], u["rows"], size=u["size"], epoch=u["epoch"],
                             version=u.get("v"))
            if od.table.size != size and not od.table.stale(u.get("v")):
                await self._reload(od)

    async def truncate(self, inode: int, size: int) -> None:
        od = self.by_inode.get(inode)
        name = od.name if od is not None else self.inodes.get(inode)
        if name is None:
            raise DiskError(errno.ENOENT)
        await self._resize(name, size, allow_shrink=True, od=od)

    async def discard(self, od: OpenDisk, offset: int, length: int) -> None:
        """Punch a hole: whole segments go back to zero at the controller; the ends are zeroed."""
        end = min(offset + length, od.table.size)
        if offset >= end:
            return
        r = await self._call("disk.discard", f"discard on {od.name}", name=od.name,
                             offset=offset, length=end - offset)
        if r["rows"]:
            start = r["rows"][0][0]
            stop = r["rows"][-1][0] + r["rows"][-1][1]
            od.table.replace(start, stop, r["rows"], epoch=r["epoch"], version=r.get("v"))
            self.invalidate(od.inode, attr_only=True)
        for lo, hi in r["zero"]:
            pos = lo
            while pos < hi:
                n = min(hi - pos, 1 << 20)
                await self.write(od, pos, bytes(n), skip_zero=True)
                pos += n

    # ------------------------------------------------------------ disks as files
    async def create(self, name: str) -> int:
        await self._call("disk.create", f"create {name}", name=name, size=0, thick=False,
                         segment_size=None, container=None)
        self._listing_at = -1e9
        await self.refresh(force=True)
        return self.inode_of(name)

    async def unlink(self, name: str) -> None:
        od = self.open.get(name)
        if od is not None:
            # like a regular file: the data stays until the last handle closes
            if od.unlinked:
                raise DiskError(errno.ENOENT)
            od.unlinked = True
            self.names.pop(name, None)
            return
        await self._call("disk.rm", f"remove {name}", name=name)
        ino = self.names.pop(name, None)
        if ino is not None:
            self.inodes.pop(ino, None)
        self.listing.pop(name, None)

    async def rename(self, old: str, new: str, replace: bool) -> None:
        """rename(2): replaces an existing target atomically (at the controller)."""
        await self.refresh(force=True)
        if old not in self.listing:
            raise DiskError(errno.ENOENT)
        if new in self.listing and not replace:
            raise DiskError(errno.EEXIST)
        await self._call("disk.rename", f"rename {old}", name=old, new=new, replace=replace)
        # the controller pushes "rename" to agents with it open (us included); do the
        # namespace part here too, for when we do not have it open
        await self.handle_push({"push": "rename", "disk": old, "new": new})
        self.listing.pop(new, None)
        self._listing_at = -1e9
