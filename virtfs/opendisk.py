"""A disk this agent has open: its table and in-flight I/O, and its state by job.

The fields are grouped by the module that owns them: ``grow`` (sizes.py: grow
ahead and trim), ``times`` (sizes.py: mtime and change time, the times timer),
``run`` (ahead.py: a sequential writer's run, allocation ahead), the faults
waiting (faults.py) and the background reload (tables.py). Pure state and small
pure rules; no I/O.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import trio

from .background import Background
from .mapcache import DiskTable, Inflight
from .qos import Limiter

# a write starting this close to the furthest end of the run so far continues it (a
# window, not an exact match: qemu-img convert and VMs keep several sequential writes in
# flight, which arrive in any order)
SEQUENTIAL_SLACK = 16 << 20


@dataclass
class GrowAhead:
    """Grow ahead (sizes.py): an appending writer grows the disk at the controller in
    large steps (to ``to`` bytes) and keeps the file's end here (``eof``, bytes; None:
    nothing grown ahead), trimmed back on fsync and close. ``lock`` serializes grow,
    trim and truncate of the disk."""

    lock: trio.Lock = field(default_factory=trio.Lock)
    eof: int | None = None
    to: int = -1


@dataclass
class Times:
    """The disk's times as this agent changed them (sizes.py): ``mtime`` (time.time()
    of the last write or size change) and ``stime`` (of any change). ``ours``: they
    are ours to show; ``dirty``: not yet sent to the controller (disk.times on close,
    fsync, utimensat or by ``timer``, which sends them a while after a write)."""

    mtime: float = 0.0
    stime: float = 0.0
    ours: bool = False
    dirty: bool = False
    timer: Background = field(default_factory=Background)

    def touch(self, mtime: float | None = None) -> None:
        """The content or size changed now (or utimensat set mtime: seconds)."""
        now = time.time()
        self.mtime = now if mtime is None else mtime
        self.stime = now
        self.ours = self.dirty = True


@dataclass
class Run:
    """A sequential writer's run (ahead.py): ``length`` bytes written sequentially
    from ``start`` up to ``end`` (the furthest end so far; -1: none yet).
    ``prefetching`` allocates ahead of it in the background."""

    end: int = -1
    length: int = 0
    start: int = 0
    prefetching: Background = field(default_factory=Background)

    def _continues(self, offset: int, end: int) -> bool:
        """A write of [offset, end) continues the run: it starts near the run's furthest
        end, and the run stays dense (at least 3/4 of the span it covers written), so
        writes in flight out of order count and jumps over unwritten space do not."""
        if abs(offset - self.end) > SEQUENTIAL_SLACK:
            return False
        span = max(self.end, end) - min(self.start, offset)
        return (self.length + end - offset) * 4 >= span * 3

    def sequential(self, offset: int, end: int, at_least: int) -> bool:
        """A write of [offset, end) continues a sequential run of at least at_least
        bytes (a segment)."""
        return self.length >= at_least and self._continues(offset, end)

    def wrote(self, offset: int, end: int) -> None:
        """[offset, end) was written: it continues the run or starts a new one."""
        if self._continues(offset, end):
            self.length += end - offset
            self.end = max(self.end, end)
            self.start = min(self.start, offset)
        else:
            self.length, self.start, self.end = end - offset, offset, end


@dataclass
class OpenDisk:
    """A disk this agent has open: its table, its in-flight I/O, its pending faults.

    inode doubles as the disk's key for sync debts (blockio): it stays with the disk
    across renames and while it is closed, for as long as the name is known here.
    handle is the controller's identity of the disk (disk.open's answer); handles
    the count of FUSE handles open on it here.
    """

    name: str
    inode: int
    table: DiskTable
    segment_size: int
    handle: int | None = None
    handles: int = 0
    unlinked: bool = False
    inflight: Inflight = field(default_factory=Inflight)
    # faults in progress, by (segment index, write): later faults there wait for it
    faults: dict[tuple[int, bool], trio.Event] = field(default_factory=dict)
    grow: GrowAhead = field(default_factory=GrowAhead)
    times: Times = field(default_factory=Times)
    run: Run = field(default_factory=Run)
    reloading: Background = field(default_factory=lambda: Background(rerun=True))
    settling: Background = field(default_factory=Background)  # size and times (settle)
    qos: Limiter | None = None  # the disk's QoS limits (qos.py); None: unlimited
    cslot: int = -1  # its slot in the C fast path (virtfs/cfast.py); -1: none

    def changed(self) -> None:
        """Its local end of file or QoS changed: the C fast path's image of it is
        emptied before this returns (the table's own changes do that themselves)."""
        if self.table.on_change is not None:
            self.table.on_change()

    def touch(self, mtime: float | None = None) -> None:
        """The content or size changed now (or utimensat set mtime: seconds)."""
        self.times.touch(mtime)

    @property
    def size(self) -> int:
        """The file's size: the local end of file while grown ahead, else the table's.
        A size the controller changed since (truncate, vdctl resize) wins."""
        if self.grow.eof is not None and self.table.size == self.grow.to:
            return self.grow.eof
        return self.table.size
