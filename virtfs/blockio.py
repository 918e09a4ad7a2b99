"""Container I/O for the agent: an fd per container, positional reads and writes, sync debts.

Reads and writes go through the host page cache (pread/pwrite, which are
page-cache fast and do not block the event loop long). Opening a container
(possibly a slow or remote path) happens once per path, in a worker thread,
and refuses a path that lies inside this agent's own mount, or whose label is
not the one the controller named (docs/labels.md).

Sync debts: every write records, for the disk it belongs to, that the
container owes it an fdatasync. The debts belong to a *disk key* (an int the
caller chooses and keeps across closes and renames), not to an open handle,
so an fsync on any later handle of the disk pays them. A failed fdatasync
poisons the container for the agent's life: Linux reports a writeback error
to one fdatasync only, so every later sync that owes anything to that
container fails too.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable

import trio

from controller import faultpoints, fsutil, label

from . import directio

log = logging.getLogger(__name__)

REFUSED_FOR = 5.0  # seconds a refused container path is not tried again
ORPHAN = -1  # the disk key of debts whose disk left the namespace: every sync pays them


class ContainerError(OSError):
    """A container cannot be used (refused path, poisoned by a failed sync): EIO."""

    def __init__(self, lun: int, message: str):
        super().__init__(errno.EIO, message)
        self.lun = lun
        self.message = message


def mount_device(mountpoint: str) -> tuple[int, int] | None:
    """(major, minor) of the file system mounted at mountpoint, from /proc/self/mountinfo.

    Never stats the mountpoint (from the agent's own event loop that would wait on
    itself). None if nothing is mounted there. The last matching line wins (the
    topmost mount). Blocking: call it from a worker thread or before the FUSE loop.
    """
    try:
        m = fsutil.mount_at(mountpoint)
    except OSError:
        return None
    return None if m is None else (m.major, m.minor)


class ContainerIO:
    """Open containers by LUN, I/O on them, and the sync debts of each disk.

    mountpoint: this agent's mount; container paths inside it are refused.
    """

    def __init__(self, mountpoint: str | None = None) -> None:
        self.paths: dict[int, str] = {}
        # LUN -> (installation id, container id) its label must carry (docs/labels.md)
        self.labels: dict[int, tuple[str, str]] = {}
        self._gen: dict[int, int] = {}  # LUN -> changes of its label (opens compare)
        self.shared: set[int] = set()  # LUNs whose I/O is O_DIRECT (set_shared)
        self._direct: set[int] = set()  # LUNs whose open fd is O_DIRECT
        self.mountpoint = mountpoint
        self._mount_dev: tuple[int, int] | None = None
        self._fds: dict[int, int] = {}
        self._retired: dict[int, list[int]] = {}  # LUN -> fds of its old paths, not yet synced
        self._opening: dict[int, trio.Event] = {}
        self._refused: dict[int, tuple[str, str, float]] = {}  # LUN -> (path, why, until)
        self._written: dict[int, int] = {}  # LUN -> writes so far
        self._synced: dict[int, int] = {}  # LUN -> writes covered by a finished sync
        self._sync_locks: dict[int, trio.Lock] = {}
        # disk key -> LUN -> the LUN's write count at the disk's last write there
        self._debts: dict[int, dict[int, int]] = {}
        self._poisoned: dict[int, str] = {}  # LUN -> why its sync failed
        # called before an fd is retired or closed and after one is opened: the C fast
        # path's tables hold fds (virtfs/cfast.py)
        self.on_change: Callable[[], None] | None = None
        # called before the sync debts are read or changed here (sync, unsynced, retire,
        # forget): the C fast path adds the debts of the writes it served (cfast.py)
        self.before_debts: Callable[[], None] | None = None

    def _fold(self) -> None:
        if self.before_debts is not None:
            self.before_debts()

    def set_shared(self, shared: set[int]) -> None:
        """The LUNs shared between hosts (docs/fencing.md): their I/O is O_DIRECT. A LUN
        that changed is reopened lazily; its old fd is kept until a sync covers it."""
        for lun in shared ^ self.shared:
            self._gen[lun] = self._gen.get(lun, 0) + 1
            self._retire(lun)
        self.shared = set(shared)

    def _retire(self, lun: int) -> None:
        """Close lun's fd now, or keep it until a sync has covered its writes."""
        if lun in self._fds and self.on_change is not None:
            self.on_change()
        self._fold()
        fd = self._fds.pop(lun, None)
        if fd is not None:
            self._direct.discard(lun)
            if self._synced.get(lun, 0) < self._written.get(lun, 0):
                self._retired.setdefault(lun, []).append(fd)
            else:
                os.close(fd)

    def set_paths(self, paths: dict[int, str],
                  labels: dict[int, tuple[str, str]] | None = None) -> None:
        """The controller's LUN -> path map, and what each LUN's label must say (LUN ->
        (installation id, container id); None: not sent, keep what we know). A LUN whose
        path or label changed is reopened (and its label checked) lazily.

        The old fd is kept until a sync has covered its writes (or close()).
        """
        for lun, path in paths.items():
            want = None if labels is None else labels.get(lun)
            if labels is not None and self.labels.get(lun) != want:
                if want is None:
                    self.labels.pop(lun, None)
                else:
                    self.labels[lun] = want
                self._refused.pop(lun, None)
                self._gen[lun] = self._gen.get(lun, 0) + 1  # an open in flight checks again
                self.paths.pop(lun, None)  # reopen below, checking the new label
            if self.paths.get(lun) != path:
                self._retire(lun)
                self.paths[lun] = path

    # ------------------------------------------------------------ opening
    def is_open(self, lun: int) -> bool:
        """True if lun's fd is open: pread/pwrite on it will not block on an open."""
        return lun in self._fds

    async def open(self, lun: int) -> None:
        """Open lun's container in a worker thread (once; concurrent callers wait for it).

        Raises OSError: the path's own errors, EIO for an unknown LUN, ContainerError
        (EIO) for a path inside this agent's mount.
        """
        while lun not in self._fds:
            pending = self._opening.get(lun)
            if pending is not None:
                await pending.wait()
                continue
            path = self.paths.get(lun)
            if path is None:
                raise OSError(errno.EIO, f"unknown container LUN {lun}")
            refused = self._refused.get(lun)
            if refused is not None and refused[0] == path and trio.current_time() < refused[2]:
                raise ContainerError(lun, refused[1])  # no trip through our mount per I/O
            ev = self._opening[lun] = trio.Event()
            gen = self._gen.get(lun, 0)
            try:
                direct = lun in self.shared
                fd = await trio.to_thread.run_sync(self._open_checked, lun, path,
                                                   self.labels.get(lun), direct)
            except ContainerError as e:
                self._refused[lun] = (path, e.message, trio.current_time() + REFUSED_FOR)
                raise
            finally:
                del self._opening[lun]
                ev.set()
            if self.paths.get(lun) != path or lun in self._fds or \
                    self._gen.get(lun, 0) != gen:
                os.close(fd)  # the path or label changed meanwhile: open and check again
                continue
            self._fds[lun] = fd
            if direct:
                self._direct.add(lun)
            if self.on_change is not None:
                self.on_change()  # (the C tables can use it once they are rebuilt)

    def _open_checked(self, lun: int, path: str, want: tuple[str, str] | None,
                      direct: bool = False) -> int:
        """(worker thread) open path (with O_DIRECT if direct), make sure it does not lead
        back into our mount, and that its label is want (installation id, container id),
        if given."""
        if self.mountpoint is not None and self._mount_dev is None:
            self._mount_dev = mount_device(self.mountpoint)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (os.O_DIRECT if direct else 0))
        except OSError as e:
            if direct and e.errno == errno.EINVAL:
                raise ContainerError(lun, f"container LUN {lun} ({path}) is shared but its "
                                     "file system has no O_DIRECT; refused") from None
            raise
        try:
            why = self._loops_back(fd)
        except OSError as e:
            os.close(fd)
            raise OSError(e.errno, f"container LUN {lun} ({path}): {e.strerror}") from None
        if why is not None:
            os.close(fd)
            raise ContainerError(lun, f"container LUN {lun} ({path}) {why}; refused (its I/O "
                                 "would wait on this agent itself)")
        if want is not None:
            try:
                why = self._label_mismatch(fd, want)
            except OSError as e:
                os.close(fd)
                raise OSError(e.errno, f"container LUN {lun} ({path}): cannot read its "
                              f"label: {e.strerror}") from None
            if why is not None:
                os.close(fd)
                log.error("container LUN %d (%s) %s; refusing its I/O", lun, path, why)
                raise ContainerError(lun, f"container LUN {lun} ({path}) {why}; refused")
        return fd

    @staticmethod
    def _label_mismatch(fd: int, want: tuple[str, str]) -> str | None:
        """(worker thread) Why fd's label is not the one the controller named, or None
        (docs/labels.md: agents check before their first I/O on a container)."""
        s0, _s1 = label.read_sectors_fd(fd)
        why = label.judge(s0, *want)
        return None if why is None else f"label {why}"

    def _loops_back(self, fd: int) -> str | None:
        """(worker thread) Why fd's I/O would come back to this mount, or None."""
        if self._mount_dev is None:
            return None
        st = os.fstat(fd)
        if (os.major(st.st_dev), os.minor(st.st_dev)) == self._mount_dev:
            return f"lies inside this agent's mount {self.mountpoint}"
        if stat.S_ISBLK(st.st_mode):
            # a loop device backed by a file in our mount is the same trap one level down
            rdev = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            try:
                with open(f"/sys/dev/block/{rdev}/loop/backing_file") as f:
                    backing = f.read().strip()
            except OSError:
                return None  # not a loop device
            try:
                bst = os.stat(backing)
            except OSError:
                return None
            if (os.major(bst.st_dev), os.minor(bst.st_dev)) == self._mount_dev:
                return f"is a loop device over {backing}, inside this agent's mount"
        return None

    def _fd(self, lun: int) -> int:
        fd = self._fds.get(lun)
        if fd is None:  # callers open() first; a path change in between lands here
            raise OSError(errno.EAGAIN, f"container LUN {lun} is not open")
        return fd

    # ------------------------------------------------------------ I/O
    def pread(self, lun: int, offset: int, length: int) -> bytes:
        """length bytes at offset of an open container; a short container is EIO."""
        fd = self._fd(lun)
        if lun in self._direct:
            return directio.pread(fd, offset, length)
        data = os.pread(fd, length, offset)
        if len(data) == length:
            return data
        parts = [data]
        got = len(data)
        while got < length:
            more = os.pread(fd, length - got, offset + got)
            if not more:
                # a container shorter than the table says: corruption, not zeros
                raise OSError(errno.EIO, f"short read on LUN {lun} at {offset + got}")
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def pwrite_fd(self, fd: int, lun: int, offset: int, data: bytes, disk: int) -> None:
        """The fast path's pwrite: all of data at offset of lun's open buffered fd (the
        caller looked it up), owed to disk key ``disk`` as pwrite's. OSError."""
        n_written = self._written[lun] = self._written.get(lun, 0) + 1
        self._debts.setdefault(disk, {})[lun] = n_written
        n = os.pwrite(fd, data, offset)
        if n != len(data):
            self._pwrite_rest(fd, memoryview(data)[n:], offset + n)

    @staticmethod
    def _pwrite_rest(fd: int, view: memoryview, offset: int) -> None:
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n

    def pwrite(self, lun: int, offset: int, data: bytes | memoryview, disk: int) -> None:
        """Write all of data at offset of an open container, owed to disk key ``disk``."""
        fd = self._fd(lun)
        view = memoryview(data)
        # owed from the first byte: a write that fails half-way may have landed in part
        n_written = self._written[lun] = self._written.get(lun, 0) + 1
        self._debts.setdefault(disk, {})[lun] = n_written
        faultpoints.hit("blockio.write")
        if lun in self._direct:
            directio.pwrite(fd, offset, view)
            return
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n

    # ------------------------------------------------------------ sync debts
    def forget_disk(self, disk: int) -> None:
        """The disk key leaves the namespace: its debts go to ORPHAN (every sync pays them)."""
        self._fold()
        debts = self._debts.pop(disk, None)
        if debts and disk != ORPHAN:
            orphan = self._debts.setdefault(ORPHAN, {})
            for lun, n in debts.items():
                orphan[lun] = max(orphan.get(lun, 0), n)

    def _check_poison(self, lun: int, n: int) -> None:
        why = self._poisoned.get(lun)
        if why is not None and n > self._synced.get(lun, 0):
            raise ContainerError(lun, f"container LUN {lun} lost writes earlier ({why})")

    def unsynced(self) -> dict[int, int]:
        """LUN -> writes on it that no finished fdatasync covers yet (the sync debt)."""
        self._fold()
        return {lun: n - self._synced.get(lun, 0) for lun, n in self._written.items()
                if n > self._synced.get(lun, 0)}

    async def sync(self, disk: int | None = None) -> None:
        """Pay the sync debts of disk key ``disk`` (default: every disk's).

        Each container counts its writes; a caller is done only when a sync that
        *started after* its writes has succeeded, so a concurrent fsync cannot return
        early on the strength of another caller's sync that may yet fail. Debts whose
        disk left the namespace (ORPHAN) are paid by every call; their failures are
        logged, not raised. Raises OSError (EIO) if a container this disk wrote to fails
        its fdatasync, now or earlier (a poisoned container keeps failing every sync
        that owes it writes).
        """
        self._fold()
        own: dict[int, int] = {}
        for k in (list(self._debts) if disk is None else [disk]):
            for lun, n in self._debts.get(k, {}).items():
                own[lun] = max(own.get(lun, 0), n)
        need = dict(self._debts.get(ORPHAN, {}))
        for lun, n in own.items():
            need[lun] = max(need.get(lun, 0), n)
        error: OSError | None = None
        for lun in sorted(need):
            try:
                await self._sync_lun(lun, need[lun])
            except OSError as e:
                if lun in own and own[lun] > self._synced.get(lun, 0):
                    error = error or e
                else:  # only a vanished disk owed it: nobody is left to tell
                    log.warning("sync of LUN %d for a disk no longer here failed: %s", lun, e)
                    self._debts.get(ORPHAN, {}).pop(lun, None)
        for k in {*(self._debts if disk is None else [disk]), ORPHAN}:
            debts = self._debts.get(k)
            if debts is not None:
                for lun in [lun for lun, n in debts.items() if self._synced.get(lun, 0) >= n]:
                    del debts[lun]
                if not debts:
                    del self._debts[k]
        if error is not None:
            raise error

    async def _sync_lun(self, lun: int, target: int) -> None:
        self._check_poison(lun, target)
        lock = self._sync_locks.setdefault(lun, trio.Lock())
        async with lock:
            if self._synced.get(lun, 0) >= target:
                return  # a sync that started after our writes succeeded meanwhile
            self._check_poison(lun, target)  # one failed while we waited
            covered = self._written.get(lun, 0)
            fds = [*self._retired.get(lun, []), *([self._fds[lun]] if lun in self._fds else [])]
            try:
                for fd in fds:
                    faultpoints.hit("blockio.sync")
                    await trio.to_thread.run_sync(os.fdatasync, fd)
            except OSError as e:
                message = f"fdatasync failed: {e.strerror or e}"
                self._poisoned[lun] = message
                log.error("container LUN %d (%s): %s; its unsynced writes are lost and every "
                          "later fsync of a disk that wrote there fails (until the agent "
                          "restarts)", lun, self.paths.get(lun), message)
                raise ContainerError(lun, f"container LUN {lun}: {message}") from None
            for fd in self._retired.pop(lun, []):
                os.close(fd)
            self._synced[lun] = max(self._synced.get(lun, 0), covered)

    def close(self) -> None:
        """Close every fd (without syncing)."""
        if self.on_change is not None:
            self.on_change()
        for lun in list(self._fds):
            os.close(self._fds.pop(lun))
        self._direct.clear()
        for fds in self._retired.values():
            for fd in fds:
                os.close(fd)
        self._retired.clear()
