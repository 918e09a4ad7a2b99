"""Installing the open disks' tables: every reply and push, one shape, one apply.

The controller sends entries in several forms: a whole table (disk.open,
disk.table), an "update" push, the "update" of a disk.resize or disk.trim
answer, and the answers of disk.fault and disk.allocate (with containers and a
size) and disk.discard (without either), whose range is that of their rows.
Each is read into a ``TableUpdate`` and installed by ``Tables.apply_update``, so
the version rules (an answer older than what the table holds only restricts it)
live in one place. Reloads (at once, or in the background one at a time per
disk) are here too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, cast

from .agent import Session
from .blockio import ContainerIO
from .errors import DiskError, call
from .kernel import KernelCache
from .mapcache import DiskTable, Rows, TableError
from .opendisk import OpenDisk
from .qos import limiter

log = logging.getLogger(__name__)


def _paths(containers: dict[str, str]) -> dict[int, str]:
    return {int(k): v for k, v in containers.items()}


def _luns(luns: list[int] | None) -> set[int] | None:
    return None if luns is None else {int(x) for x in luns}


def _labels(labels: dict[str, list[str]] | None) -> dict[int, tuple[str, str]] | None:
    """LUN -> (installation id, container id) its label must carry; None if not sent
    (a controller from before labels)."""
    if labels is None:
        return None
    return {int(k): (str(v[0]), str(v[1])) for k, v in labels.items()}


@dataclass(frozen=True)
class TableUpdate:
    """Entries of one disk from the controller, in whichever form they came.

    rows: the entries of [start, end) (mapcache.Rows: a list per row, or the compact
    form); start and end are None for an answer without rows (what it asked about is
    past the disk's end now). size (bytes), epoch, version ("v": the controller's
    stamp, None: none sent), containers (LUN -> path) and labels (LUN -> what its
    label must say, docs/labels.md) are None when not sent.
    whole: a whole table (installed with DiskTable.load, not replace); drain: a push
    that waits for the I/O in flight in its range.
    Fields are taken as sent: DiskTable checks them (TableError).
    """

    rows: Rows
    start: int | None
    end: int | None
    size: int | None = None
    epoch: int | None = None
    version: int | None = None
    containers: dict[int, str] | None = None
    labels: dict[int, tuple[str, str]] | None = None
    shared: set[int] | None = None  # LUNs shared between hosts (O_DIRECT); None: not sent
    whole: bool = False
    drain: bool = False

    @classmethod
    def table(cls, t: dict[str, Any]) -> TableUpdate:
        """A whole table: a disk.open or disk.table answer (no "v" counts as 0).
        Raises KeyError if a field is missing."""
        return cls(t["rows"], 0, t["size"], t["size"], t["epoch"], t.get("v", 0),
                   _paths(t["containers"]), _labels(t.get("labels")),
                   _luns(t.get("shared")), whole=True)

    @classmethod
    def ranged(cls, u: dict[str, Any]) -> TableUpdate:
        """An "update" push, or the "update" of a disk.resize / disk.trim answer: the
        entries of [start, end) after resizing to size (its containers, if any, are
        not taken: only fault, allocate and whole-table answers bring them).
        Raises KeyError if a field is missing."""
        return cls(u["rows"], u["start"], u["end"], u["size"], u["epoch"], u.get("v"),
                   drain=bool(u.get("drain")))

    @classmethod
    def answer(cls, r: dict[str, Any]) -> TableUpdate:
        """A disk.fault, disk.allocate or disk.discard answer: its rows cover the range
        they tile (the compact form is only sent for a whole disk: [0, size)); no rows,
        no range. Raises KeyError, TableError if the rows cannot give a range."""
        rows = r["rows"]
        size = r.get("size")
        containers = r.get("containers")
        start: int | None = None
        end: int | None = None
        if type(rows) is dict:
            if size is None:
                raise TableError("compact rows in an answer without a size")
            start, end = 0, size
        elif rows:
            start, end = rows[0][0], rows[-1][0] + rows[-1][1]
        return cls(rows, start, end, size, r.get("epoch"), r.get("v"),
                   None if containers is None else _paths(containers),
                   _labels(r.get("labels")), _luns(r.get("shared")))


class Tables:
    """The one way entries from the controller get into the open disks' tables."""

    def __init__(self, session: Session, io: ContainerIO, kernel: KernelCache):
        self.session = session
        self.io = io
        self.kernel = kernel
        # the newest version stamp pushed per disk name, open or not (see new_table)
        self._pushed_v: dict[str, int] = {}

    def note_push(self, name: str, v: Any) -> None:
        """Remember the newest version stamp pushed for a disk name."""
        if isinstance(v, int):
            self._pushed_v[name] = max(self._pushed_v.get(name, 0), v)

    def pushed(self, name: str) -> int:
        """The newest version stamp pushed for a disk name (0: none)."""
        return self._pushed_v.get(name, 0)

    def new_table(self, name: str, u: TableUpdate) -> DiskTable:
        """The table of a disk being opened, from its whole table u (a disk.open
        answer); one older than a push already seen for the name is all restricted.
        Raises TableError on rows that do not tile the disk."""
        if u.shared is not None:
            self.io.set_shared(u.shared)
        if u.containers is not None:
            self.io.set_paths(u.containers, u.labels)
        # taken as sent (TableUpdate.table has them all): DiskTable checks them
        v = cast(int, u.version)
        table = DiskTable(name, cast(int, u.size), cast(int, u.epoch), u.rows, v)
        if v < self.pushed(name):
            # a push for this disk overtook the open's answer: trust nothing yet
            table.restrict(0, table.size)
        return table

    def apply_update(self, table: DiskTable, u: TableUpdate) -> bool:
        """Install u in table: containers first, then a whole table (load), a range
        (replace, after resizing to u.size), or for an answer without rows only its
        size (unless older than the table). An answer older than the table restricts
        what it covers instead (DiskTable.load/replace). Returns whether rows were
        applied. Raises TableError (the table unchanged) on rows or sizes that do
        not fit."""
        if u.shared is not None:
            self.io.set_shared(u.shared)
        if u.containers is not None:
            self.io.set_paths(u.containers, u.labels)
        if u.whole:
            return table.load(cast(int, u.size), cast(int, u.epoch), u.rows, u.version)
        if u.start is None or u.end is None:
            if u.size is not None and u.size != table.size and not table.stale(u.version):
                table.resize(u.size)
            return False
        return table.replace(u.start, u.end, u.rows, size=u.size, epoch=u.epoch,
                             version=u.version)

    async def apply_push(self, od: OpenDisk, u: TableUpdate) -> None:
        """An "update" push: new entries for [start, end), maybe drain in-flight I/O
        there. Entries that do not fit restrict the whole table and reload it. Never
        raises DiskError or TableError."""
        try:
            self.apply_update(od.table, u)
        except TableError as e:
            log.warning("bad update for %s (%s); reloading the table", od.name, e)
            od.table.restrict(0, od.table.size)
            await self.reload_or_restrict(od, timeout=self.session.lease)
        if u.drain and u.start is not None and u.end is not None:
            await od.inflight.drain(u.start, u.end)
        self.kernel.invalidate(od.inode)

    async def apply_freeze(self, od: OpenDisk, msg: dict[str, Any]) -> None:
        """A "freeze" push ({"push": "freeze", "disk", "epoch", "v", "drain"}): every
        entry of od held now turns nowrite in O(1) (DiskTable.fence; a snapshot is being
        taken, docs/snapshots.md), then the I/O begun before it is waited for (a write
        begun after it faults), so the ack means no write goes on under the old entries.
        Never raises."""
        od.table.fence(msg.get("v"))
        self.kernel.invalidate(od.inode)
        if msg.get("drain"):
            await od.inflight.settle()

    async def reload(self, od: OpenDisk, timeout: float | None = None) -> None:
        """Fetch and install a fresh copy of od's table (timeout: seconds, default the
        session's call timeout). Raises DiskError, TableError."""
        t = await call(self.session, "disk.table", f"reload {od.name}", timeout=timeout,
                       name=od.name)
        self.apply_update(od.table, TableUpdate.table(t))
        od.qos = limiter(t.get("qos"))  # (a "qos" push may have been lost meanwhile)
        od.changed()
        self.kernel.invalidate(od.inode)

    async def reload_or_restrict(self, od: OpenDisk, timeout: float | None = None) -> bool:
        """reload(od); if that fails, restrict the whole table (every I/O then faults
        and gets its entries from the controller) and log why. Never raises DiskError
        or TableError; True if the reload succeeded."""
        try:
            await self.reload(od, timeout=timeout)
            return True
        except (DiskError, TableError) as e:
            log.warning("reload of %s failed (%s); its I/O goes through the controller "
                        "until a reload succeeds", od.name, e)
            od.table.restrict(0, od.table.size)
            self.kernel.invalidate(od.inode)
            return False

    def reload_soon(self, od: OpenDisk) -> None:
        """Reload od's table in the background; coalesced (one at a time per disk: a
        request while one runs makes one more after it, while the disk is open).

        Bounded by the lease; a reload that fails leaves the whole table restricted
        (every I/O faults to the controller) until a later one succeeds. Never raises.
        """
        async def run() -> None:
            await self.reload_or_restrict(od, timeout=self.session.lease)

        od.reloading.start(self.session.start_soon, run, more=lambda: od.handles > 0)
