"""The mount's directory: disk names, inode numbers, the listing, create/unlink/rename.

Inode numbers are the agent's own (the controller has none): a name gets one
the first time the kernel looks it up, and keeps it across renames. The
listing is the controller's ``disk.ls``, cached for LISTING_TTL seconds and
dropped early by namespace pushes. The open disks live here too (by current
name and by inode), because lookup, listing and unlink depend on them.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from controller.protocol import former_name

from .agent import Session
from .errors import DiskError, call
from .kernel import KernelCache

if TYPE_CHECKING:
    from .opendisk import OpenDisk

LISTING_TTL = 1.0  # seconds a disk.ls answer is trusted
STATFS_TTL = 2.0  # seconds a status answer is trusted
ROOT_INODE = 1


@dataclass
class DiskInfo:
    """A disk as listed: sizes in bytes, times in seconds since the epoch (ctime: its
    creation; mtime: its last write or size change; stime: its last change of any kind)."""

    name: str
    size: int
    allocated: int
    ctime: float
    mtime: float = 0.0
    stime: float = 0.0
    # owner uid, group gid, mode; None: the mount's default (virtfs/perms.py)
    owner: int | None = None
    group: int | None = None
    mode: int | None = None


def listed(r: dict[str, Any]) -> DiskInfo:
    """A disk.ls (or disk.info) row as listed (older controllers send no permissions)."""
    return DiskInfo(r["name"], r["size"], r["allocated"], r["ctime"],
                    r.get("mtime", r["ctime"]), r.get("changed", r["ctime"]),
                    r.get("owner"), r.get("group"), r.get("mode"))


class Namespace:
    """Names <-> inodes, the cached listing, and the open disks by name and by inode."""

    def __init__(self, session: Session, kernel: KernelCache,
                 on_forget: Callable[[int], None] = lambda inode: None):
        self.session = session
        self.kernel = kernel
        self.on_forget = on_forget  # an inode (a disk key) no longer names a disk here
        self.inodes: dict[int, str] = {}
        self.names: dict[str, int] = {}
        self._next_inode = ROOT_INODE + 1
        self.listing: dict[str, DiskInfo] = {}
        self._listing_at = -1e9
        self.open: dict[str, OpenDisk] = {}  # by current name
        self.by_inode: dict[int, OpenDisk] = {}
        self._statfs: tuple[float, dict[str, Any]] | None = None

    def stale(self) -> None:
        """The listing (and the pool's figures, statfs) may be out of date: the next
        refresh asks the controller, so df agrees with vdctl after a change made here."""
        self._listing_at = -1e9
        self._statfs = None

    def inode_of(self, name: str) -> int:
        """The inode of name, allocating one if it has none yet."""
        ino = self.names.get(name)
        if ino is None:
            ino = self._next_inode
            self._next_inode += 1
            self.names[name] = ino
            self.inodes[ino] = name
        return ino

    def forget(self, name: str) -> None:
        """name no longer names a disk here: drop its inode (a closed disk's only)."""
        ino = self.names.pop(name, None)
        if ino is not None:
            self.forget_inode(ino)

    def forget_inode(self, ino: int) -> None:
        """ino names no disk any more (it is never reused)."""
        self.inodes.pop(ino, None)
        self.on_forget(ino)

    async def refresh(self, force: bool = False) -> None:
        """Reload the listing if older than LISTING_TTL (or force). Raises DiskError."""
        if not force and trio.current_time() - self._listing_at < LISTING_TTL:
            return
        # snapshots (NAME@SNAP) too: they show as read-only files
        rows = await call(self.session, "disk.ls", "list disks", snapshots=True)
        self.listing = {r["name"]: listed(r) for r in rows if former_name(r["name"]) is None}
        self._listing_at = trio.current_time()
        for name in list(self.names):
            if name not in self.listing and name not in self.open:
                self.forget(name)

    async def lookup(self, name: str) -> int:
        """The inode of an existing disk; DiskError(ENOENT) if there is none."""
        od = self.open.get(name)
        if od is not None and od.unlinked:
            raise DiskError(errno.ENOENT)
        if od is None:
            await self.refresh(force=name not in self.listing)
            if name not in self.listing:
                raise DiskError(errno.ENOENT)
        return self.inode_of(name)

    async def info(self, inode: int) -> DiskInfo:
        """Name, sizes and ctime of a disk; an open disk's sizes come from its table."""
        od = self.by_inode.get(inode)
        if od is not None:
            base = self.listing.get(od.name)
            ctime = base.ctime if base else 0.0
            perms = (base.owner, base.group, base.mode) if base else (None, None, None)
            if od.times.ours or base is None:
                # written (or touched) here since it was opened: our times are newest
                return DiskInfo(od.name, od.size, od.table.allocated, ctime,
                                od.times.mtime or ctime, od.times.stime or ctime, *perms)
            return DiskInfo(od.name, od.size, od.table.allocated, ctime, base.mtime,
                            base.stime, *perms)
        name = self.inodes.get(inode)
        if name is None:
            raise DiskError(errno.ENOENT)
        await self.refresh()
        info = self.listing.get(name)
        if info is None:
            raise DiskError(errno.ENOENT)
        return info

    async def listdir(self) -> list[tuple[str, int]]:
        """(name, inode) of every disk, sorted by name; unlinked open disks are hidden."""
        await self.refresh()
        hidden = {n for n, od in self.open.items() if od.unlinked or former_name(n) is not None}
        names = sorted((set(self.listing) | set(self.open)) - hidden)
        return [(n, self.inode_of(n)) for n in names]

    async def statfs(self) -> dict[str, Any]:
        """The controller's status (capacity, used, disks), cached for STATFS_TTL seconds."""
        now = trio.current_time()
        if self._statfs is None or now - self._statfs[0] > STATFS_TTL:
            self._statfs = (now, await call(self.session, "status", "statfs"))
        return self._statfs[1]

    # ------------------------------------------------------------ changes
    async def create(self, name: str) -> int:
        """Create an empty thin disk; its inode. DiskError(EEXIST) if the name is taken."""
        await call(self.session, "disk.create", f"create {name}", name=name, size=0,
                   thick=False, segment_size=None, container=None)
        self.stale()
        await self.refresh(force=True)
        return self.inode_of(name)

    async def set_perms(self, name: str, uid: int | None, gid: int | None,
                        mode: int | None) -> None:
        """chmod, chown: disk.perms at the controller (which tells the other mounts),
        and the answer into our listing at once. DiskError."""
        r = await call(self.session, "disk.perms", f"change permissions of {name}",
                       name=name, uid=uid, gid=gid, mode=mode)
        self.listing[name] = listed(r)

    async def unlink(self, name: str) -> None:
        """Remove a disk; one open here or in another mount only hides its name until
        its last close (disk.unlink: the controller decides, as it knows every open)."""
        od = self.open.get(name)
        if od is not None:
            # like a regular file: the data stays until the last handle closes, and the
            # name is free at once: the controller renames the disk to a name no file
            # can have (protocol.deleted_name) and removes it when the last agent closes
            if od.unlinked:
                raise DiskError(errno.ENOENT)
            r = await call(self.session, "disk.unlink", f"remove {name}", name=name)
            od.unlinked = True
            if r["name"] != name:
                self.apply_rename(name, r["name"])  # its rename push did it already
            self.names.pop(name, None)
            self.listing.pop(name, None)
            return
        # open elsewhere only (else it is simply removed): the same, the controller
        # renames it and removes it when the other mounts' last handle closes
        await call(self.session, "disk.unlink", f"remove {name}", name=name)
        self.forget(name)
        self.listing.pop(name, None)

    async def rename(self, old: str, new: str, replace: bool) -> None:
        """rename(2): replaces an existing target atomically (at the controller)."""
        await self.refresh(force=True)
        if old not in self.listing:
            raise DiskError(errno.ENOENT)
        if new in self.listing and not replace:
            raise DiskError(errno.EEXIST)
        ino = self.names.get(old)
        await call(self.session, "disk.rename", f"rename {old}", name=old, new=new,
                   replace=replace)
        # the kernel now has ino under the new name, even if the controller's "old is
        # gone" hint (a namespace push) was handled first and forgot it
        if ino is not None:
            self.move_name(ino, new)
        # the controller pushes "rename" to agents with it open (us included); do the
        # namespace part here too, for when we do not have it open
        self.apply_rename(old, new)
        self.listing.pop(new, None)
        self.stale()

    # ------------------------------------------------------------ pushes
    def apply_rename(self, old: str, new: str) -> None:
        """A "rename" push (or our own rename): move the inode and the open disk.

        Idempotent, and safe in any order against an open of the disk: an open that
        was answered under the new name has already moved both (see Volumes.open_disk).
        """
        ino = self.names.get(old)
        if ino is not None:
            self.move_name(ino, new)
        od = self.open.get(old)
        if od is not None and self.open.get(new) is None:
            del self.open[old]
            od.name = new
            self.open[new] = od
        self.stale()

    def move_name(self, ino: int, name: str) -> None:
        """ino's disk is now called name (a rename): whatever name meant before is gone."""
        was = self.inodes.get(ino)
        if was is not None and self.names.get(was) == ino:
            del self.names[was]
        tgt = self.names.get(name)
        if tgt is not None and tgt != ino and tgt not in self.by_inode:
            self.forget_inode(tgt)  # rename(2) over it replaced that disk
        self.names[name] = ino
        self.inodes[ino] = name

    async def apply_namespace(self, msg: dict[str, Any]) -> None:
        """A "namespace" push: disks were created, changed or removed elsewhere; "perms":
        [[name, owner, group, mode], ...], a disk's new permissions (disk.perms), taken
        into the listing at once (an open disk's attributes come from it unreloaded)."""
        self.stale()
        for name, owner, group, mode in msg.get("perms", []):
            info = self.listing.get(name)
            if info is not None:
                self.listing[name] = dataclasses.replace(info, owner=owner, group=group,
                                                         mode=mode)
        for name in msg.get("changed", []):
            ino = self.names.get(name)
            if ino is not None:  # e.g. a size set with vdctl: seen before we ack
                await self.kernel.invalidate_wait(ino)
        for name in msg.get("removed", []):
            if name not in self.open and former_name(name) is None:
                self.kernel.invalidate_entry(name)
                self.forget(name)
                self.listing.pop(name, None)
