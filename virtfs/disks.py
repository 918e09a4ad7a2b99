"""The agent's model of its disks: open/close, pushes from the controller, reconnects.

Volumes ties the parts together: the namespace (namespace.py: names, inodes,
the listing), the data path (datapath.py: I/O through each open disk's table)
and the session (agent.py). fuse_ops talks to ``volumes.ns``, ``volumes.data``
and the open/close/truncate calls here. Errors leave as DiskError(errno).
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from controller.client import Client
from controller.protocol import RemoteError

from .agent import Session
from .blockio import ContainerIO
from .datapath import DataPath, OpenDisk
from .errors import DiskError, call
from .kernel import KernelCache
from .namespace import Namespace

log = logging.getLogger(__name__)


class Volumes:
    """The open disks of one mount, kept coherent with the controller."""

    def __init__(self, session: Session, io: ContainerIO, *, fault_timeout: float = 30.0):
        self.session = session
        self.io = io
        self.kernel = KernelCache()
        self.ns = Namespace(session, self.kernel)
        self.data = DataPath(session, io, self.kernel, fault_timeout=fault_timeout,
                             on_resize=self.ns.stale)
        session.on_push = self.handle_push
        session.on_reconnect = self.reload_all

    # ------------------------------------------------------------ open / close
    async def open_disk(self, inode: int) -> OpenDisk:
        """Open (or count one more handle on) the disk at inode. DiskError (ENOENT...)."""
        ns = self.ns
        name = ns.inodes.get(inode)
        if name is None:
            raise DiskError(errno.ENOENT)
        od = ns.open.get(name)
        if od is None:
            t = await call(self.session, "disk.open", f"open {name}", name=name)
            od = ns.open.get(name)  # another open may have raced us
            if od is None:
                od = OpenDisk(name, inode, self.data.load(None, name, t), t["segment_size"])
                ns.open[name] = od
                ns.by_inode[inode] = od
            else:
                await call(self.session, "disk.close", f"close {name}", name=name)
        od.handles += 1
        return od

    async def release(self, od: OpenDisk) -> None:
        """Drop one handle; the last one closes the disk (and removes it if unlinked)."""
        od.handles -= 1
        if od.handles > 0:
            return
        ns = self.ns
        ns.stale()  # the listing's sizes may be older than our table
        ns.open.pop(od.name, None)
        ns.by_inode.pop(od.inode, None)
        try:
            await call(self.session, "disk.close", f"close {od.name}", name=od.name)
            if od.unlinked:
                await call(self.session, "disk.rm", f"remove {od.name}", name=od.name)
        finally:
            if od.unlinked:
                ns.inodes.pop(od.inode, None)

    async def truncate(self, inode: int, size: int) -> None:
        """Resize the disk at inode to size bytes (shrinking allowed). DiskError."""
        od = self.ns.by_inode.get(inode)
        name = od.name if od is not None else self.ns.inodes.get(inode)
        if name is None:
            raise DiskError(errno.ENOENT)
        await self.data.resize(name, size, allow_shrink=True, od=od)

    async def reload_all(self, client: Client) -> None:
        """After reconnecting: a new registration, so re-open and reload every open disk."""
        for name, od in list(self.ns.open.items()):
            try:
                t = await client.call("disk.open", name=name)
                self.data.load(od, name, t)
            except RemoteError as e:
                log.error("disk %s cannot be reopened after reconnecting: %s", name, e.message)
                od.table.restrict(0, od.table.size)
            self.kernel.invalidate(od.inode)

    # ------------------------------------------------------------ pushes
    async def handle_push(self, msg: dict[str, Any]) -> None:
        """Apply one controller push (update, rename, namespace, epochs)."""
        kind = msg.get("push")
        if kind == "update":
            self.data.note_push(msg["disk"], msg.get("v"))
            od = self.ns.open.get(msg["disk"])
            if od is None:
                return
            await self.data.apply_update(od, msg)
            info = self.ns.listing.get(od.name)
            if info is not None:
                info.size = od.table.size
        elif kind == "rename":
            self.ns.apply_rename(msg["disk"], msg["new"])
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
                    try:
                        await self.data.reload(od)
                    except DiskError as e:
                        log.warning("reload of %s failed: %s", name, e)
