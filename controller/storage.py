"""Container files and devices as the controller touches them (blocking; run in threads).

The controller does no data-path I/O, only: probe or create a container,
and zero space before handing it out, so a new segment never shows a former
disk's data. Files get holes punched (thin on the host too); block devices
get BLKZEROOUT, or zeros written where that is not supported.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct

from . import protocol as P

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKZEROOUT = 0x127F  # _IO(0x12, 127)
_ZERO_CHUNK = 1 << 20

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def punch_hole(fd: int, offset: int, length: int) -> None:
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def size_of(path: str) -> tuple[int, bool]:
    """(size, is_block_device) of an existing file or block device."""
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.lseek(fd, 0, os.SEEK_END), True
        finally:
            os.close(fd)
    if stat.S_ISREG(st.st_mode):
        return st.st_size, False
    raise P.invalid(f"container path {path!r} is neither a regular file nor a block device")


def check_container_path(path: str) -> None:
    if "\0" in path or not os.path.isabs(path):
        raise P.invalid(f"container path {path!r} must be absolute")
    if os.path.normpath(path) != path or ".." in path.split("/"):
        raise P.invalid(f"container path {path!r} must be normalised (no '..', '//', "
                        "or trailing '/')")


def open_container_path(path: str, size: int | None, taken: dict[str, str]) -> tuple[int, bool]:
    """Probe (or create, sparse) a container's file; (size to use, created)."""
    real = os.path.realpath(path)
    for other, cname in taken.items():
        if os.path.realpath(other) == real:
            raise P.RemoteError(P.E_EXISTS, f"{path!r} is already container {cname!r}")
    if os.path.lexists(path):
        fsize, _blk = size_of(path)
        if size is not None and size > fsize:
            raise P.invalid(f"{path!r} holds {fsize} bytes, less than --size {size}")
        csize = size if size is not None else fsize
        if csize < 4096:
            raise P.invalid(f"{path!r} is smaller than 4096 bytes")
        return csize, False
    if size is None:
        raise P.RemoteError(P.E_NOT_FOUND, f"container path {path!r} does not exist (give "
                            "--size to create a sparse file there)")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise P.RemoteError(P.E_NOT_FOUND, f"directory {parent!r} does not exist")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise P.RemoteError(P.E_IO, f"cannot create {path!r}: {e.strerror}") from None
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        os.unlink(path)
        raise P.RemoteError(P.E_IO, f"cannot size {path!r}: {e.strerror}") from None
    os.close(fd)
    return size, True


def zero_ranges(path: str, ranges: list[tuple[int, int]], preallocate: bool = False) -> None:
    """Make [offset, offset+length) read as zeros, durably.

    In a file container the range becomes a hole (thin on the host too), or with
    preallocate (thick disks) zeroed space the host filesystem has reserved, so a thick
    disk never meets ENOSPC from the host and its first writes allocate nothing.
    """
    if not ranges:
        return
    fd = os.open(path, os.O_RDWR)
    try:
        is_blk = stat.S_ISBLK(os.fstat(fd).st_mode)
        for offset, length in ranges:
            if is_blk:
                try:
                    fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, length))
                    continue
                except OSError as e:
                    if e.errno not in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
                        raise
            else:
                try:
                    if preallocate:
                        fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                    else:
                        punch_hole(fd, offset, length)
                    continue
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                        raise
            _write_zeros(fd, offset, length)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _write_zeros(fd: int, offset: int, length: int) -> None:
    zeros = bytes(min(_ZERO_CHUNK, length))
    end = offset + length
    while offset < end:
        n = os.pwrite(fd, memoryview(zeros)[: min(len(zeros), end - offset)], offset)
        offset += n


def release_ranges(path: str, ranges: list[tuple[int, int]]) -> None:
    """Return freed space to the host: punch holes in a file container (devices: nothing)."""
    fd = os.open(path, os.O_RDWR)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
        for offset, length in ranges:
            punch_hole(fd, offset, length)
    finally:
        os.close(fd)


def zero_bytes(path: str, offset: int, length: int) -> None:
    """Write zeros over a small, possibly unaligned range, durably."""
    fd = os.open(path, os.O_RDWR)
    try:
        _write_zeros(fd, offset, length)
        os.fdatasync(fd)
    finally:
        os.close(fd)
