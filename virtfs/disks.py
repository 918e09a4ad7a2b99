"""The agent's model of its disks: open/close, pushes from the controller, reconnects.

Volumes ties the parts together: the namespace (namespace.py: names, inodes,
the listing), the data path (datapath.py: I/O through each open disk's table,
with its tables, faults, sizes and allocation ahead) and the session
(agent.py). fuse_ops talks to ``volumes.ns``, ``volumes.data`` and the
open/close/truncate calls here. Errors leave as DiskError(errno).
"""

from __future__ import annotations

import errno
import logging
import time
from typing import Any

from controller.client import Client
from controller.protocol import RemoteError

from .agent import Session
from .blockio import ContainerIO
from .datapath import DataPath
from .errors import DiskError, call
from .kernel import KernelCache
from .mapcache import TableError
from .namespace import Namespace
from .opendisk import OpenDisk
from .qos import limiter
from .tables import TableUpdate

log = logging.getLogger(__name__)


class Volumes:
    """The open disks of one mount, kept coherent with the controller."""

    def __init__(self, session: Session, io: ContainerIO, *, fault_timeout: float = 30.0):
        self.session = session
        self.io = io
        self.kernel = KernelCache()
        self.ns = Namespace(session, self.kernel, on_forget=io.forget_disk)
        self.data = DataPath(session, io, self.kernel, fault_timeout=fault_timeout,
                             on_resize=self.ns.stale)
        session.on_push = self.handle_push
        session.on_reconnect = self.reload_all

    # ------------------------------------------------------------ open / close
    async def open_disk(self, inode: int) -> OpenDisk:
        """Open (or count one more handle on) the disk at inode. DiskError (ENOENT...).

        A rename may overtake the open: the disk is installed under its name *now*,
        which is the inode's name if a rename push moved it while we waited, else the
        name the controller's answer carries (the name when the answer was made).
        """
        ns = self.ns
        asked = ns.inodes.get(inode)
        if asked is None:
            raise DiskError(errno.ENOENT)
        od = self._installed(inode, asked)
        if od is None:
            t = await call(self.session, "disk.open", f"open {asked}", name=asked)
            now = ns.inodes.get(inode, asked)
            name = now if now != asked else t.get("name", asked)
            od = self._installed(inode, name)  # another open raced us
            if od is None:
                if name != asked:
                    log.info("disk %s was renamed to %s while it was being opened", asked, name)
                    ns.move_name(inode, name)
                    self.data.tables.note_push(name, self.data.tables.pushed(asked))
                try:
                    table = self.data.tables.new_table(name, TableUpdate.table(t))
                except TableError as e:
                    await self._close_at_controller(name, t.get("handle"))
                    raise DiskError(errno.EIO, f"open {name}: bad table ({e})") from None
                od = OpenDisk(name, inode, table, t["segment_size"], handle=t.get("handle"),
                              qos=limiter(t.get("qos")))
                ns.open[name] = od
                ns.by_inode[inode] = od
            else:
                await self._close_at_controller(name, t.get("handle"))
        od.handles += 1
        return od

    def _installed(self, inode: int, name: str) -> OpenDisk | None:
        """The open disk at inode, or under name unless that one is unlinked (an unlinked
        open disk is not what a later create of the same name made)."""
        od = self.ns.by_inode.get(inode)
        if od is None:
            od = self.ns.open.get(name)
            if od is not None and od.unlinked:
                return None
        return od

    async def _close_at_controller(self, name: str, handle: int | None) -> None:
        """disk.close; by handle (the disk's identity at the controller) when we have one."""
        args: dict[str, Any] = {"name": name}
        if handle is not None:
            args["handle"] = handle
        await call(self.session, "disk.close", f"close {name}", **args)

    async def release(self, od: OpenDisk) -> None:
        """Drop one handle; the last one closes the disk (and removes it if unlinked)."""
        od.handles -= 1
        if od.handles > 0:
            return
        ns = self.ns
        if not od.unlinked:
            await self.data.sizes.settle(od)  # what grow ahead took past the end, and times
        if od.handles > 0:
            return  # opened again while the trim waited
        ns.stale()  # the listing's sizes may be older than our table
        if ns.open.get(od.name) is od:
            del ns.open[od.name]
        if ns.by_inode.get(od.inode) is od:
            del ns.by_inode[od.inode]
        try:
            # an unlinked disk is removed by the controller when its last agent closes it
            await self._close_at_controller(od.name, od.handle)
        finally:
            if od.unlinked:
                ns.forget_inode(od.inode)

    async def truncate(self, inode: int, size: int) -> None:
        """Resize the disk at inode to size bytes (shrinking allowed). DiskError."""
        od = self.ns.by_inode.get(inode)
        name = od.name if od is not None else self.ns.inodes.get(inode)
        if name is None:
            raise DiskError(errno.ENOENT)
        if od is None:
            await self.data.sizes.resize(name, size, allow_shrink=True, od=od)
            await self._times_at_controller(inode, time.time())
            return
        await self.data.sizes.truncate(od, size)
        od.touch()

    async def set_times(self, inode: int, mtime: float | None) -> None:
        """utimensat (touch): mtime (None: keep it; only atime was asked, which is not
        kept) and the change time now, at the controller at once. DiskError."""
        if mtime is None:
            mtime = (await self.ns.info(inode)).mtime
        od = self.ns.by_inode.get(inode)
        if od is not None:
            od.touch(mtime)
            await self.data.sizes.save_times(od)
            return
        await self._times_at_controller(inode, mtime)

    async def _times_at_controller(self, inode: int, mtime: float) -> None:
        """disk.times for a disk not open here: mtime, and the change time now."""
        name = self.ns.inodes.get(inode)
        if name is None:
            raise DiskError(errno.ENOENT)
        await call(self.session, "disk.times", f"times of {name}", name=name, mtime=mtime,
                   stime=time.time())
        self.ns.stale()

    async def reload_all(self, client: Client) -> None:
        """After reconnecting: a new registration, so re-open and reload every open disk,
        then wait for the I/O begun under the tables before (Inflight.settle). The session
        heartbeats only after this: from then on every entry we use, and every write
        still in flight, is under the controller's own tables (docs/fencing.md)."""
        opened = list(self.ns.open.items())
        for name, od in opened:
            try:
                t = await client.call("disk.open", name=name)
                od.handle = t.get("handle")
                self.data.tables.apply_update(od.table, TableUpdate.table(t))
            except (RemoteError, TableError) as e:
                log.error("disk %s cannot be reopened after reconnecting: %s", name, e)
                od.table.restrict(0, od.table.size)
            self.kernel.invalidate(od.inode)
        for _name, od in opened:
            await od.inflight.settle()

    # ------------------------------------------------------------ pushes
    async def handle_push(self, msg: dict[str, Any]) -> None:
        """Apply one controller push (update, freeze, rename, namespace, epochs)."""
        kind = msg.get("push")
        if kind == "update":
            self.data.tables.note_push(msg["disk"], msg.get("v"))
            od = self.ns.open.get(msg["disk"])
            if od is None:
                return
            await self.data.tables.apply_push(od, TableUpdate.ranged(msg))
            info = self.ns.listing.get(od.name)
            if info is not None:
                info.size = od.size
        elif kind == "freeze":
            self.data.tables.note_push(msg["disk"], msg.get("v"))
            od = self.ns.open.get(msg["disk"])
            if od is not None:
                await self.data.tables.apply_freeze(od, msg)
        elif kind == "rename":
            old, new, handle = msg["disk"], msg["new"], msg.get("handle")
            if handle is not None and old not in self.ns.open:
                # the controller's identity of the disk finds it under whatever name we
                # installed it (an open answered before an earlier rename reached us)
                for od in self.ns.open.values():
                    if od.handle == handle and od.name != new:
                        old = od.name
                        break
            self.ns.apply_rename(old, new)
        elif kind == "shared":
            # a container became shared (or not): new fds are O_DIRECT (or not), and
            # what the old ones wrote is synced before the controller hears back, so no
            # dirty page of a shared container outlives this ack (docs/fencing.md)
            self.io.set_shared({int(x) for x in msg["shared"]})
            try:
                await self.io.sync()
            except OSError as e:
                log.error("sync after a container's sharing changed: %s", e)
        elif kind == "qos":
            od = self.ns.open.get(msg["disk"])
            if od is not None:
                od.qos = limiter(msg.get("qos"))
                od.changed()
        elif kind == "namespace":
            await self.ns.apply_namespace(msg)
        elif kind == "epochs":
            for name, epoch in msg["epochs"].items():
                od = self.ns.open.get(name)
                if od is not None and epoch is None:
                    # the controller no longer has it: use none of its entries
                    od.table.restrict(0, od.table.size)
                    continue
                if od is not None and epoch != od.table.epoch:
                    log.info("disk %s: table epoch %d, controller has %d; reloading",
                             name, od.table.epoch, epoch)
                    self.data.tables.reload_soon(od)
