"""Container I/O for the agent: an fd per container, positional reads and writes.

Reads and writes go through the host page cache (pread/pwrite, which are
page-cache fast and do not block the event loop long); ``sync`` makes them
durable with fdatasync in a worker thread.
"""

from __future__ import annotations

import errno
import os

import trio


class ContainerIO:
    def __init__(self) -> None:
        self.paths: dict[int, str] = {}
        self._fds: dict[int, int] = {}
        self._written: dict[int, int] = {}  # LUN -> writes so far
        self._synced: dict[int, int] = {}  # LUN -> writes covered by a finished sync
        self._sync_locks: dict[int, trio.Lock] = {}

    def set_paths(self, paths: dict[int, str]) -> None:
        for lun, path in paths.items():
            if self.paths.get(lun) != path:
                self._close(lun)
                self.paths[lun] = path

    def _close(self, lun: int) -> None:
        fd = self._fds.pop(lun, None)
        if fd is not None:
            os.close(fd)

    def fd(self, lun: int) -> int:
        fd = self._fds.get(lun)
        if fd is None:
            path = self.paths.get(lun)
            if path is None:
                raise OSError(errno.EIO, f"unknown container LUN {lun}")
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            self._fds[lun] = fd
        return fd

    def pread(self, lun: int, offset: int, length: int) -> bytes:
        fd = self.fd(lun)
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

    def pwrite(self, lun: int, offset: int, data: bytes | memoryview) -> None:
        fd = self.fd(lun)
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n
        self._written[lun] = self._written.get(lun, 0) + 1

    async def sync(self, luns: set[int] | None = None) -> None:
        """fdatasync the given (default: all) containers that have unsynced writes.

        Each container counts its writes; a caller is done only when a sync that
        *started after* its writes has succeeded, so a concurrent fsync cannot return
        early on the strength of another caller's sync that may yet fail.
        """
        for lun in sorted(self._written if luns is None else luns):
            target = self._written.get(lun, 0)
            lock = self._sync_locks.setdefault(lun, trio.Lock())
            async with lock:
                if self._synced.get(lun, 0) >= target:
                    continue  # a sync that started after our writes succeeded meanwhile
                covered = self._written.get(lun, 0)
                await trio.to_thread.run_sync(os.fdatasync, self.fd(lun))
                self._synced[lun] = max(self._synced.get(lun, 0), covered)

    def close(self) -> None:
        for lun in list(self._fds):
            self._close(lun)
