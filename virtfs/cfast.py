"""The C fast path: worker threads that serve plain FUSE reads and writes without Python.

``virtfs-mount --fast-threads N`` (N >= 1; 0, the default, is off) starts N pthreads
of the C extension ``virtfs._fastio`` (virtfs/_fastio.c) that read the mount's
/dev/fuse fd themselves. A FUSE_READ (or FUSE_WRITE, of a handle open for writing)
whose range lies in one entry of the disk's C table that allows it is answered
there: one pread/pwrite on the container, one writev of the reply, with no Python.
Every other request (and every I/O the C table does not cover) is handed over raw
to the trio side: ``CFast.run``
feeds it to libfuse (``pyfuse3.process_raw``, third_party/pyfuse3/fastpath.patch)
and runs the handler's coroutine in the nursery, as pyfuse3's own loop would;
pyfuse3's loop itself does not read (``pyfuse3.main(reader=False)``).

The C table of a disk is the image of what ``DataPath.plain`` would answer
(docs/fencing.md: no container I/O without a valid lease):

- the entries neither zero, invalid nor failed whose container is open and not
  O_DIRECT (shared), ending at the disk's size, on a disk without QoS and not
  grown ahead (its local end of file is the table's size); those neither nowrite
  nor held since a freeze (DiskTable.fence) may be written too;
- the lease deadline, in CLOCK_MONOTONIC ns, one for the agent: set at each
  renewal (Session.on_renew), never later than the trio-clock ``lease_until``.

Every change that can narrow it empties the disk's C table synchronously before
it returns (``CFast.dirty``: the C write lock waits for any read in flight), so
before the change is acknowledged: a table change (DiskTable.on_change: load,
replace, restrict, resize, fence), a change of the local end of file or the QoS
(OpenDisk.changed), a container fd retired, closed or opened (ContainerIO.on_change:
every disk), the last handle of a disk closed. The table is rebuilt (in C, from the
table's columns) when a read of the disk reaches Python while it is empty.

What the Python fast path does per write besides the pwrite is counted in C and
folded into Python (``CFast.fold``) every 50 ms, before each batch of requests
handed over (so before any fsync, getattr or flush that follows a write) and
before blockio reads or changes the sync debts: the write's sync debt (fsync
fdatasyncs every container the disk wrote), the times, the run and allocation
ahead (DataPath._wrote over the extent written), the metrics. $VIRTFS_FAST_WRITES=0
leaves writes to Python (comparisons). If the extension is missing or the pyfuse3
lacks the patch, the agent says so once and runs the Python path.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import time
from collections.abc import Coroutine
from typing import Any

import pyfuse3
import trio

from controller.metrics_http import LATENCY_BUCKETS
from controller.protocol import ERROR, INVALID, NOWRITE, ZERO

from .datapath import DataPath
from .metrics import AgentMetrics
from .opendisk import OpenDisk

log = logging.getLogger(__name__)

_fastio: Any
try:
    from . import _fastio
except ImportError as _err:  # not built (optional extension): the Python path
    _fastio = None
    _IMPORT_ERROR = str(_err)
else:
    _IMPORT_ERROR = ""

THREADS_ENV = "VIRTFS_FAST_THREADS"  # the default of --fast-threads (tests cover both)
FUSE_READ, FUSE_WRITE = 15, 16  # linux/fuse.h
_NOT_READ = ZERO | INVALID | ERROR  # as DataPath.plain
_NOT_WRITE = _NOT_READ | NOWRITE
WRITES_ENV = "VIRTFS_FAST_WRITES"  # "0": the C readers serve reads only (comparisons)
LEASE_MARGIN = 0.002  # seconds the C deadline stays short of the lease (clock reads)
FOLD_EVERY = 0.05  # seconds between folds of the C counters into the metrics
_HEADER = struct.Struct("=IIQ")  # fuse_in_header: len, opcode, unique (then more)
_FH = struct.Struct("=Q")  # fuse_read_in.fh and fuse_write_in.fh, at offset 40


def unavailable() -> str | None:
    """Why the C fast path cannot run here (the extension or the pyfuse3 patch is
    missing), or None."""
    if _fastio is None:
        return f"virtfs._fastio is not built ({_IMPORT_ERROR})"
    if not hasattr(pyfuse3, "process_raw") or not hasattr(pyfuse3, "get_session_fd"):
        return "the pyfuse3 lacks virtfs's fastpath.patch (third_party/pyfuse3/README.md)"
    return None


def stats() -> tuple[int, int, int]:
    """(FUSE reads served in C, writes served in C, requests handed over to Python)
    since the process started; zeros without the extension."""
    return (0, 0, 0) if _fastio is None else _fastio.stats()


class CFast:
    """The Python half of the C fast path of one mount (one per process: the C side
    keeps module-level state).

    threads: C reader threads (>= 1). Use: ``attach`` each part's hooks, ``start``
    after pyfuse3.init, ``bind``/``unbind`` FUSE handles, ``run`` in the nursery, and
    ``stop`` before pyfuse3.close (it joins the threads; the fd must stay open).
    """

    def __init__(self, data: DataPath, threads: int, writes: bool = True):
        self.data = data
        self.session = data.session
        self.io = data.io
        self.threads = threads
        self.writes = writes
        self.metrics: AgentMetrics | None = None
        self._ods: dict[int, OpenDisk] = {}  # C slot -> the open disk it images
        self._fh: dict[int, OpenDisk] = {}  # bound FUSE handle -> its disk
        self._dirty: set[int] = set()  # slots emptied since their last publish
        self._free: list[int] = []  # slots of closed disks (empty, counters folded)
        self._wake = -1
        self.running = False

    # ------------------------------------------------------------ the hooks
    def attach(self, od: OpenDisk) -> int:
        """od's C slot (made on first use); its table's changes empty it from now on."""
        assert _fastio is not None
        slot = od.cslot
        if slot < 0 or self._ods.get(slot) is not od:
            slot = od.cslot = self._free.pop() if self._free else _fastio.new_disk()
            self._ods[slot] = od
            self._dirty.add(slot)
            od.table.on_change = lambda: self.dirty(od)
        return slot

    def dirty(self, od: OpenDisk) -> None:
        """od's C table may be wider than DataPath.plain now: empty it (no C read uses
        the old one when this returns); rebuilt at od's next read in Python."""
        slot = od.cslot
        if slot >= 0 and self._ods.get(slot) is od and _fastio is not None:
            _fastio.invalidate(slot)
            self._dirty.add(slot)

    def dirty_all(self) -> None:
        """Every disk's C table: dirty (a container fd opened, retired or closed)."""
        for od in list(self._ods.values()):
            self.dirty(od)

    def bind(self, fh: int, od: OpenDisk, writable: bool) -> None:
        """FUSE handle fh reads od (and writes it, if writable)."""
        if _fastio is None:
            return
        slot = self.attach(od)
        self._fh[fh] = od
        _fastio.bind(fh, slot, writable)

    def unbind(self, fh: int) -> None:
        """fh is released: no C read of it from now on; the disk's last handle empties
        and forgets its slot."""
        od = self._fh.pop(fh, None)
        if od is None or _fastio is None:
            return
        _fastio.unbind(fh)
        if od not in self._fh.values():
            self.dirty(od)  # (and every I/O that found it through a handle is over)
            self._fold(od.cslot, od)
            self._ods.pop(od.cslot, None)
            self._dirty.discard(od.cslot)
            self._free.append(od.cslot)
            od.cslot = -1
            od.table.on_change = None

    def renewed(self) -> None:
        """The lease was renewed: its deadline, in CLOCK_MONOTONIC ns, for the C reads."""
        if _fastio is None:
            return
        left = self.session.lease_until - trio.current_time() - LEASE_MARGIN
        _fastio.set_lease(int((time.monotonic() + left) * 1e9) if left > 0 else 0)

    def publish(self, od: OpenDisk) -> int:
        """Rebuild od's C table from what DataPath.plain would serve a read from now;
        returns its entries (0: none, e.g. QoS or grown ahead)."""
        assert _fastio is not None
        slot = od.cslot
        self._dirty.discard(slot)
        t = od.table
        if od.qos is not None or od.size != t.size:
            _fastio.invalidate(slot)
            return 0
        io = self.io
        luns = [lun for lun in io._fds if lun not in io._direct]
        return int(_fastio.publish(slot, t._vs, t._lu, t._of, t._fl, t._gen, t.gen, t.size,
                                   luns, [io._fds[lun] for lun in luns], _NOT_READ,
                                   _NOT_WRITE if self.writes else 0xFF))

    # ------------------------------------------------------------ the threads
    def start(self) -> None:
        """Start the C readers on the session's fd (after pyfuse3.init). OSError."""
        assert _fastio is not None
        self.session.on_renew = self.renewed
        self.io.on_change = self.dirty_all
        self.io.before_debts = self.fold
        self.renewed()
        try:
            self._wake = _fastio.start(pyfuse3.get_session_fd(), self.threads,
                                       [round(b * 1e9) for b in LATENCY_BUCKETS], self.writes)
        except BaseException:
            _fastio.stop()
            self.session.on_renew = None
            self.io.on_change = self.io.before_debts = None
            raise
        self.running = True

    def stop(self) -> None:
        """Stop and join the C readers (idempotent); the requests still queued are
        dropped (the session is ending)."""
        if _fastio is not None and self.running:
            self.running = False
            trio.lowlevel.notify_closing(self._wake)  # run() waits on it: closed next
            _fastio.stop()
            self.session.on_renew = None
            self.io.on_change = None
            _fastio.set_lease(0)
            self.fold()
            self.io.before_debts = None

    async def run(self, nursery: trio.Nursery) -> None:
        """Hand the requests the C readers pass over to libfuse, each handler's
        coroutine in nursery; ends the FUSE main loop (pyfuse3.terminate) when the
        readers see the session end (unmounted)."""
        assert _fastio is not None
        while self.running:
            try:
                await trio.lowlevel.wait_readable(self._wake)
            except (trio.ClosedResourceError, OSError):
                return
            try:
                os.read(self._wake, 8)
            except BlockingIOError:
                pass
            requests, ended = _fastio.take()
            self.fold()  # what C served before these requests were read: before them
            for fh, lun, coff, err, write in _fastio.errors():
                od = self._fh.get(fh)
                if od is not None:  # logged and reported (io.error) as the Python path does
                    self.data._io_error(od, "write" if write else "read", lun, coff,
                                        OSError(err, os.strerror(err)))
            for raw in requests:
                self._one(raw, nursery)
            if ended:
                if ended != errno.ENODEV:
                    log.error("the C fast path's readers stopped: %s", os.strerror(ended))
                pyfuse3.terminate()
                return

    def _one(self, raw: bytes, nursery: trio.Nursery) -> None:
        if len(raw) >= 48 and _HEADER.unpack_from(raw)[1] in (FUSE_READ, FUSE_WRITE):
            od = self._fh.get(_FH.unpack_from(raw, 40)[0])
            if od is not None and od.cslot in self._dirty:
                self.publish(od)  # an I/O in Python: the table may serve the next ones
        coro = pyfuse3.process_raw(raw)
        if coro is not None:
            nursery.start_soon(_await, coro)

    async def fold_timer(self) -> None:
        """Fold the C counters into Python every FOLD_EVERY seconds."""
        while True:
            await trio.sleep(FOLD_EVERY)
            self.fold()

    def fold(self) -> None:
        """Fold what C served since the last fold into Python, as the Python fast path
        does per I/O: each write's sync debt (blockio: before any sync, sync-debt
        read, retire or forget of a container fd, and before each request handed
        over), the disk's times, run and allocation ahead (DataPath._wrote, for the
        extent written), the metrics."""
        if _fastio is None or not _fastio.pending():
            return
        for slot, od in list(self._ods.items()):
            self._fold(slot, od)

    def _fold(self, slot: int, od: OpenDisk) -> None:
        if _fastio is None or slot < 0:
            return
        reads, writes, luns, (lo, hi), (last_lo, last_hi) = _fastio.counters(slot)
        io = self.io
        for lun, n in luns:
            w = io._written[lun] = io._written.get(lun, 0) + n
            io._debts.setdefault(od.inode, {})[lun] = w
        if hi >= 0:
            if hi - lo == writes[1]:  # one contiguous run (a sequential writer)
                self.data._wrote(od, lo, hi)
            else:
                self.data._wrote(od, last_lo, last_hi)
        m = self.metrics
        if m is not None:
            if reads[0]:
                m.disk(od.name).read_many(reads[0], reads[1], reads[2] / 1e9, reads[3])
            if writes[0]:
                m.disk(od.name).write_many(writes[0], writes[1], writes[2] / 1e9, writes[3])


async def _await(coro: Coroutine[Any, Any, None]) -> None:
    await coro
