"""pyfuse3 adapter: translate FUSE requests to the model (disks.py and its parts), map errors.

Nothing here knows about tables or containers. Every handler goes through
``@handler``: DiskError becomes its errno, FUSEError passes, and anything else
is logged with its traceback and becomes EIO, because pyfuse3 tears the whole
mount down on any other exception.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from controller import faultpoints
from controller.protocol import (
    BLOCK_SIZE,
    SNAP_SEP,
    RemoteError,
    check_name,
    is_snapshot_name,
)

from . import perms
from .cfast import CFast
from .disks import Volumes
from .errors import DiskError
from .namespace import ROOT_INODE
from .opendisk import OpenDisk

log = logging.getLogger(__name__)

ATTR_TIMEOUT = 1.0
UNOPEN_TIMEOUT = 10.0  # seconds to close a disk at the controller after a failed open
_SNAP_SEP = SNAP_SEP.encode()  # in names as the kernel hands them over
# st_blksize, the "preferred I/O size": cp, rsync, tar and friends size their buffers
# by it, and at 128 KiB (their floor) a copy costs a FUSE request per 128 KiB
IO_SIZE = 1 << 20

T = TypeVar("T")
PS = ParamSpec("PS")


def handler(fn: Callable[PS, Coroutine[Any, Any, T]]) -> Callable[PS, Coroutine[Any, Any, T]]:
    name = fn.__name__.removeprefix("slow_")  # slow_read is "read" (fuse.handler=raise:read)

    @functools.wraps(fn)
    async def wrapper(*args: PS.args, **kwargs: PS.kwargs) -> T:
        try:
            faultpoints.hit("fuse.handler", name)  # tests: fuse.handler=raise:NAME
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except DiskError as e:
            if e.errno in (errno.ENOENT, errno.EEXIST, errno.EOPNOTSUPP, errno.ENXIO, errno.EROFS):
                log.debug("%s: %s", name, e)
            else:
                log.warning("%s: %s", name, e)
            raise pyfuse3.FUSEError(e.errno) from None
        except trio.Cancelled:
            raise
        except Exception:
            log.exception("unexpected error in FUSE handler %s; returning EIO", name)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _name(raw: bytes) -> str:
    try:
        name = os.fsdecode(raw)
        check_name(name)
    except (UnicodeError, RemoteError):
        raise DiskError(errno.EINVAL, f"bad disk name {raw!r}") from None
    return name


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, volumes: Volumes, nursery: trio.Nursery):
        super().__init__()
        self.v = volumes
        self.nursery = nursery
        self.handles: dict[int, tuple[OpenDisk, bool]] = {}
        self._next_fh = 1
        self.uid, self.gid = os.getuid(), os.getgid()
        self.initialized = trio.Event()  # the kernel's INIT has been answered
        self.cfast: CFast | None = None  # the C fast path of reads (mount.py, cfast.py)
        self.started = time.time()
        volumes.kernel.invalidate = self._invalidate
        volumes.kernel.invalidate_wait = self._invalidate_wait
        volumes.kernel.invalidate_entry = lambda name: pyfuse3.invalidate_entry_async(
            ROOT_INODE, os.fsencode(name), ignore_enoent=True)

    def init(self) -> None:
        self.initialized.set()

    # ------------------------------------------------------------ helpers
    def _invalidate(self, inode: int, attr_only: bool = False) -> None:
        # never from inside a handler's own call chain: the kernel may be waiting on
        # this very request, so run it in a thread and do not wait for it
        async def run() -> None:
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, attr_only)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    log.debug("invalidate_inode(%d): %s", inode, e)

        self.nursery.start_soon(run)

    async def _invalidate_wait(self, inode: int) -> None:
        """Drop the kernel's cached attributes of inode, and wait (briefly) until it has."""
        with trio.move_on_after(2):
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, True,
                                              abandon_on_cancel=True)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    log.debug("invalidate_inode(%d): %s", inode, e)

    def _attr(self, inode: int, size: int = 0, allocated: int = 0,
              ctime: float = 0.0) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.generation = 0
        a.entry_timeout = ATTR_TIMEOUT
        a.attr_timeout = ATTR_TIMEOUT
        if inode == ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        else:
            # a snapshot (NAME@SNAP; '@' is in no disk name) is a read-only file
            a.st_mode = stat.S_IFREG | (0o444 if self._is_snapshot(inode) else 0o644)
            a.st_nlink = 1
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_size = size
        a.st_blksize = IO_SIZE
        a.st_blocks = -(-allocated // BLOCK_SIZE) * (BLOCK_SIZE // 512)  # last block whole
        ns = int(ctime * 1e9)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = ns
        return a

    def _is_snapshot(self, inode: int) -> bool:
        return is_snapshot_name(self.v.ns.inodes.get(inode, ""))

    async def _disk_attr(self, inode: int) -> pyfuse3.EntryAttributes:
        if inode == ROOT_INODE:
            return self._attr(ROOT_INODE, ctime=self.started)
        info = await self.v.ns.info(inode)
        a = self._attr(inode, info.size, info.allocated, info.ctime)
        who = perms.shown(info.owner, info.group, info.mode, self._is_snapshot(inode),
                          (self.uid, self.gid))
        a.st_mode, a.st_uid, a.st_gid = stat.S_IFREG | who.mode, who.uid, who.gid
        a.st_mtime_ns = a.st_atime_ns = int((info.mtime or info.ctime) * 1e9)
        a.st_ctime_ns = int((info.stime or info.ctime) * 1e9)
        return a

    def _fh(self, od: OpenDisk, writable: bool) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = (od, writable)
        if self.cfast is not None:
            self.cfast.bind(fh, od, writable)
        return fh

    def _handle(self, fh: int, write: bool = False) -> OpenDisk:
        try:
            od, writable = self.handles[fh]
        except KeyError:
            raise DiskError(errno.EBADF) from None
        if write and not writable:
            raise DiskError(errno.EBADF)
        return od

    # ------------------------------------------------------------ namespace
    @handler
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None
                     ) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT_INODE:
            raise DiskError(errno.ENOTDIR)
        if name == b".":
            return await self._disk_attr(ROOT_INODE)
        try:
            disk = os.fsdecode(name)
        except UnicodeError:
            raise DiskError(errno.ENOENT) from None
        return await self._disk_attr(await self.v.ns.lookup(disk))

    @handler
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return await self._disk_attr(inode)

    @handler
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: Any,
                      fh: int | None, ctx: Any) -> pyfuse3.EntryAttributes:
        if inode == ROOT_INODE:
            raise DiskError(errno.EPERM)
        if fields.update_size and self._is_snapshot(inode):
            raise DiskError(errno.EROFS, "snapshots are read-only")
        if fields.update_size:
            await self.v.truncate(inode, attr.st_size)
        if fields.update_mtime or fields.update_atime:
            # utimensat (touch, rsync -a): mtime is kept (atime is not: it shows mtime)
            await self.v.set_times(inode, attr.st_mtime_ns / 1e9 if fields.update_mtime
                                   else None)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            await self._set_perms(inode, attr, fields, ctx)
        return await self._disk_attr(inode)

    async def _set_perms(self, inode: int, attr: pyfuse3.EntryAttributes, fields: Any,
                         ctx: Any) -> None:
        """chmod, chown, chgrp: checked as chmod(2) and chown(2) do (virtfs/perms.py),
        then kept at the controller (disk.perms), which tells the other mounts."""
        if self._is_snapshot(inode):
            raise DiskError(errno.EROFS, "snapshots are read-only")
        cur = await self._disk_attr(inode)
        uid = attr.st_uid if fields.update_uid else None
        gid = attr.st_gid if fields.update_gid else None
        mode = attr.st_mode & perms.MODE_BITS if fields.update_mode else None
        groups = perms.caller_groups(ctx.pid, ctx.gid) if gid is not None else set()
        perms.check_change(ctx.uid, groups,
                           perms.Owner(cur.st_uid, cur.st_gid, stat.S_IMODE(cur.st_mode)),
                           uid, gid, mode)
        name = self.v.ns.inodes.get(inode)
        if name is None:
            raise DiskError(errno.ENOENT)
        od = self.v.ns.by_inode.get(inode)
        await self.v.ns.set_perms(od.name if od is not None else name, uid, gid, mode)

    @handler
    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != ROOT_INODE:
            raise DiskError(errno.ENOTDIR)
        return 0

    @handler
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        entries = await self.v.ns.listdir()
        for i, (name, inode) in enumerate(entries[start_id:], start_id):
            try:
                attr = await self._disk_attr(inode)
            except DiskError:
                continue  # vanished meanwhile
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, i + 1):
                break

    @handler
    async def releasedir(self, fh: int) -> None:
        return None

    @handler
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        st = await self.v.ns.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = BLOCK_SIZE
        s.f_blocks = st["capacity"] // BLOCK_SIZE
        s.f_bfree = s.f_bavail = max(0, st["capacity"] - st["used"]) // BLOCK_SIZE
        s.f_ffree = s.f_favail = 1 << 20
        s.f_files = s.f_ffree + st["disks"] + 1
        s.f_namemax = 128
        return s

    @handler
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        if parent_inode != ROOT_INODE:
            raise DiskError(errno.ENOTDIR)
        if not stat.S_ISREG(mode):
            raise DiskError(errno.EPERM)
        inode = await self.v.ns.create(_name(name))
        od = await self.v.open_disk(inode)
        try:
            attr = await self._disk_attr(inode)
        except BaseException:
            await self._unopen(od)
            raise
        return pyfuse3.FileInfo(fh=self._fh(od, True), keep_cache=False), attr

    @handler
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        if not stat.S_ISREG(mode):
            raise DiskError(errno.EPERM)
        return await self._disk_attr(await self.v.ns.create(_name(name)))

    @handler
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        raise DiskError(errno.EPERM)

    @handler
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        raise DiskError(errno.EPERM)

    @handler
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: Any) -> pyfuse3.EntryAttributes:
        raise DiskError(errno.EPERM)

    @handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        if parent_inode != ROOT_INODE:
            raise DiskError(errno.ENOTDIR)
        if _SNAP_SEP in name:
            raise DiskError(errno.EPERM, "remove snapshots with: vdctl snap rm NAME@SNAP")
        await self.v.ns.unlink(os.fsdecode(name))

    @handler
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise DiskError(errno.EINVAL)
        if _SNAP_SEP in name_old:
            raise DiskError(errno.EPERM, "a snapshot keeps its name (NAME@SNAP)")
        await self.v.ns.rename(os.fsdecode(name_old), _name(name_new),
                            replace=not flags & pyfuse3.RENAME_NOREPLACE)

    # ------------------------------------------------------------ data
    @handler
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if inode == ROOT_INODE:
            raise DiskError(errno.EISDIR)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable and self._is_snapshot(inode):
            raise DiskError(errno.EROFS, "snapshots are read-only")
        od = await self.v.open_disk(inode)
        try:
            if flags & os.O_TRUNC and writable:
                await self.v.truncate(inode, 0)
        except BaseException:
            await self._unopen(od)  # the kernel gets an error: it will never release this
            raise
        # keep_cache=False: the kernel drops this file's page cache at every open, so a
        # reopen sees what other agents wrote
        return pyfuse3.FileInfo(fh=self._fh(od, writable), keep_cache=False)

    async def _unopen(self, od: OpenDisk) -> None:
        """Undo open_disk for an open that fails: the handle count, and the disk's open
        at the controller if it was the last. Shielded (the open may be cancelled) and
        bounded; never raises."""
        with trio.move_on_after(UNOPEN_TIMEOUT) as scope:
            scope.shield = True
            try:
                await self.v.release(od)
            except Exception as e:
                log.warning("closing %s after a failed open: %s", od.name, e)
        if scope.cancelled_caught:
            log.warning("closing %s after a failed open took too long", od.name)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        # the fast path (datapath.py) first: no await; None for anything it does not serve
        h = self.handles.get(fh) if self.v.data.fast else None
        if h is not None:
            got = self._fast("read", self.v.data.fast_read, h[0], off, size)
            if got is not None:
                return got  # type: ignore[no-any-return]
        return await self.slow_read(fh, off, size)

    def _fast(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args), the fast path's read or write: its answer, or None for the general
        path. A failed container I/O (DiskError) is the caller's error, as on the
        general path (handler); any other exception is a bug: it is logged, and every
        later request goes through the general path (pyfuse3 would tear the mount down)."""
        try:
            return fn(*args)
        except DiskError as e:
            log.warning("%s: %s", what, e)
            raise pyfuse3.FUSEError(e.errno) from None
        except Exception:
            log.exception("unexpected error in the fast path (%s); it is off from now on",
                          what)
            self.v.data.fast = False
            return None

    @handler
    async def slow_read(self, fh: int, off: int, size: int) -> bytes:
        return await self.v.data.read(self._handle(fh), off, size)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self.handles.get(fh) if self.v.data.fast else None
        if h is not None and h[1]:
            n = self._fast("write", self.v.data.fast_write, h[0], off, buf)
            if n is not None:
                return n  # type: ignore[no-any-return]
        return await self.slow_write(fh, off, buf)

    @handler
    async def slow_write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.v.data.write(self._handle(fh, write=True), off, buf)

    @handler
    async def flush(self, fh: int) -> None:
        # close(2): the size grown ahead is trimmed before close returns, so the
        # controller (vdctl, other mounts) has the file's size once it is closed
        od, writable = self.handles.get(fh, (None, False))
        if od is not None and writable:
            await self.v.data.sizes.settle(od)  # vdctl and other mounts agree once closed

    @handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        od = self._handle(fh)
        # the size is part of what fsync makes durable (its times follow by a timer:
        # a journal record per fsync would be one per write for fio --fsync=1 and VMs)
        await self.v.data.sizes.settle(od, times=False)
        await self.v.data.fsync(od)

    @handler
    async def release(self, fh: int) -> None:
        od, _ = self.handles.pop(fh, (None, False))
        if self.cfast is not None:
            self.cfast.unbind(fh)  # no C read of fh from now on
        if od is not None:
            await self.v.release(od)

    @handler
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        await self.v.data.ahead.fallocate(self._handle(fh, write=True), mode, offset, length)

    @handler
    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        # the kernel sends only SEEK_DATA and SEEK_HOLE (our pyfuse3 lseek patch)
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise DiskError(errno.EINVAL)
        return self.v.data.seek(self._handle(fh), offset, whence == os.SEEK_DATA)

    @handler
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None
