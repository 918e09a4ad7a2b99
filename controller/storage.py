"""Container files and devices as the controller touches them (blocking; run in threads).

The controller does no data-path I/O, only: probe or create a container,
and zero space before handing it out, so a new segment never shows a former
disk's data. Files get holes punched (thin on the host too); block devices
get BLKZEROOUT, or zeros written where that is not supported.

Every function here that writes a container takes ``may_write`` (a
controller/writegate.py WriteGate) and asks it right before each write, fallocate,
punch or BLKZEROOUT (``gate``), in the worker thread doing the I/O: a group's leader
whose term ended while it was paused mid-copy writes nothing more once it runs again
(docs/ha.md, "Split brain"). The default, ``unfenced``, is a controller that runs
alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Callable
from typing import TypeVar

from . import faultpoints, fsutil
from . import protocol as P
from .units import human
from .writegate import WriteGate, gate, unfenced

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKZEROOUT = 0x127F  # _IO(0x12, 127)
_ZERO_CHUNK = 1 << 20

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
T = TypeVar("T")


_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


# ioprio_set(2) / ioprio_get(2): no libc wrapper; syscall numbers per architecture
_IOPRIO_SYSCALLS = {"x86_64": (251, 252), "aarch64": (30, 31), "i686": (289, 290)}
_IOPRIO_WHO_PROCESS = 1  # with who=0: the calling thread
IOPRIO_CLASS_BE = 2
# the copier's I/O priority: best effort, level 7 (the lowest), not class idle: a write
# fault on blocks being copied waits for the copier's step, so a copier that could be
# starved would stall writers (the same inversion made nice 19 cost more than it saved:
# bench movement --quick, one run each on a loaded machine, write p99 during a migration
# 9.8x at rest with nice 19 against 6.7x without, read p99 2.3x against 1.5x, idle
# migration 0.31x of cp against 0.44x)
COPIER_IOPRIO = (IOPRIO_CLASS_BE << 13) | 7


def _ioprio(get: bool, value: int = 0) -> int | None:
    """ioprio_get / ioprio_set of the calling thread; None where unsupported."""
    nums = _IOPRIO_SYSCALLS.get(os.uname().machine)
    if nums is None:
        return None
    r = (_libc.syscall(nums[1], _IOPRIO_WHO_PROCESS, 0) if get
         else _libc.syscall(nums[0], _IOPRIO_WHO_PROCESS, 0, value))
    return None if r < 0 else int(r)


def low_priority(fn: Callable[..., T], *args: object) -> T:
    """Run fn(*args) in this thread at the background copier's I/O priority
    (COPIER_IOPRIO, ioprio_set; the I/O scheduler decides whether it means anything:
    `none` and `mq-deadline` ignore it, `bfq` honours it), then restore the thread's
    own (it is a pooled worker thread). A failure to change it is ignored: it only
    costs latency."""
    old = _ioprio(True)
    if old is not None:
        _ioprio(False, COPIER_IOPRIO)
    try:
        return fn(*args)
    finally:
        if old is not None:
            _ioprio(False, old)


def sync_file_range(fd: int, offset: int, length: int, flags: int) -> None:
    """sync_file_range(2): write back (and wait for) one range's dirty pages only."""
    if _libc.sync_file_range(fd, offset, length, flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


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


def mount_of(dev: int) -> tuple[str, str, str] | None:
    """(mount point, fs type, source) of the mount whose device is dev, from mountinfo.

    Reads /proc/self/mountinfo only (proc(5)): it never touches the mount itself.
    """
    for m in fsutil.mounts():
        if (m.major, m.minor) == (os.major(dev), os.minor(dev)):
            return m.mountpoint, m.fstype, m.source
    return None


def refuse_virtfs_mount(path: str) -> None:
    """Raise E_INVALID if path (or, if it does not exist, its directory) is on a virtfs mount.

    A container inside a virtfs mount would have an agent do its container I/O through a
    FUSE mount that may be its own: the I/O waits for a request that the same, blocked
    event loop should serve, and the agent, its controller and the writer hang in the
    kernel. The check is by the file system's device (after symlinks), not by the path's
    prefix. Stat the path from a worker thread, never from the loop that serves a mount.
    """
    where = path if os.path.lexists(path) else os.path.dirname(path)
    try:
        dev = os.stat(where).st_dev
    except OSError:
        return  # the caller reports a missing path
    m = mount_of(dev)
    if m is not None and (m[1] == "fuse.virtfs" or m[2] == "virtfs"):
        raise P.invalid(f"container path {path!r} is inside the virtfs mount {m[0]!r}; "
                        "a container must lie outside every virtfs mount")


def open_container_path(path: str, size: int | None, taken: dict[str, str],
                        may_write: WriteGate = unfenced) -> tuple[int, bool]:
    """Probe (or create, sparse) a container's file; (size to use, created).

    Raises RemoteError: E_EXISTS (already a container), E_INVALID (too small, not a file
    or device, inside a virtfs mount), E_NOT_FOUND, E_IO (also: may_write says no before
    the file is created).
    """
    refuse_virtfs_mount(path)
    real = os.path.realpath(path)
    for other, cname in taken.items():
        if os.path.realpath(other) == real:
            raise P.RemoteError(P.E_EXISTS, f"{path!r} is already container {cname!r}")
    if os.path.lexists(path):
        fsize, _blk = size_of(path)
        if size is not None and size > fsize:
            raise P.invalid(f"{path!r} holds {human(fsize)}, less than --size {human(size)}")
        csize = size if size is not None else fsize
        if csize < P.BLOCK_SIZE:
            raise P.invalid(f"{path!r} is smaller than {human(P.BLOCK_SIZE)}")
        return csize, False
    if size is None:
        raise P.RemoteError(P.E_NOT_FOUND, f"container path {path!r} does not exist (give "
                            "--size to create a sparse file there)")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise P.RemoteError(P.E_NOT_FOUND, f"directory {parent!r} does not exist")
    try:
        gate(may_write, "a new container file", path)
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


def zero_ranges(path: str, ranges: list[tuple[int, int]], preallocate: bool = False,
                may_write: WriteGate = unfenced) -> None:
    """Make [offset, offset+length) (block-aligned bytes) read as zeros, durably.

    In a file container the range becomes a hole (thin on the host too), or with
    preallocate (thick disks) zeroed space the host filesystem has reserved, so a thick
    disk never meets ENOSPC from the host and its first writes allocate nothing; a block
    device gets BLKZEROOUT. Durability costs one 4 KiB O_DSYNC write (see ``_settle``),
    never an fdatasync of the whole container, which would also write back every agent's
    dirty data in it. Raises OSError (Fenced before any write may_write refuses).
    """
    if not ranges:
        return
    fd = os.open(path, os.O_RDWR)
    try:
        is_blk = stat.S_ISBLK(os.fstat(fd).st_mode)
        for offset, length in ranges:
            gate(may_write, f"zeroing at {offset}", path)
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
            _write_zeros(fd, offset, length, may_write)  # durable by itself (RWF_DSYNC)
        _settle(fd, ranges[0][0], may_write)
    finally:
        os.close(fd)


def _settle(fd: int, offset: int, may_write: WriteGate) -> None:
    """Make earlier punches, zero-range and BLKZEROOUT calls on fd durable, cheaply.

    One 4 KiB write of zeros with RWF_DSYNC at offset (inside a range just zeroed) is a
    range-limited fsync (vfs_fsync_range over those 4 KiB): on ext4 it writes back only
    that range and commits the fs journal, which holds the earlier extent changes of the
    file (a punch updates the inode's datasync tid); on XFS it forces the log likewise;
    on a block device, blkdev_fsync writes back the range and flushes the device's
    cache, which covers the completed BLKZEROOUT. fdatasync(fd) would do the same and
    also write back every dirty page of the whole container.
    """
    zeros = bytes(P.BLOCK_SIZE)
    gate(may_write, f"settling zeroed space at {offset}")
    n = os.pwritev(fd, [zeros], offset, os.RWF_DSYNC)
    if n != len(zeros):
        raise OSError(errno.EIO, f"short write while settling zeroed space at {offset}")


def _write_zeros(fd: int, offset: int, length: int, may_write: WriteGate) -> None:
    """Write zeros over [offset, offset+length), each write durable (RWF_DSYNC)."""
    zeros = bytes(min(_ZERO_CHUNK, length))
    end = offset + length
    while offset < end:
        gate(may_write, f"zeros at {offset}")
        n = os.pwritev(fd, [memoryview(zeros)[: min(len(zeros), end - offset)]], offset,
                       os.RWF_DSYNC)
        offset += n


def release_ranges(path: str, ranges: list[tuple[int, int]],
                   may_write: WriteGate = unfenced) -> None:
    """Return freed space to the host: punch holes in a file container (devices: nothing).

    A late punch into space another leader has handed out again would destroy data, so
    each punch asks may_write first (the fault point ``storage.release`` is hit just
    before). Raises OSError (Fenced)."""
    fd = os.open(path, os.O_RDWR)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
        for offset, length in ranges:
            faultpoints.hit("storage.release")
            gate(may_write, f"a punch at {offset}", path)
            punch_hole(fd, offset, length)
    finally:
        os.close(fd)


def zero_bytes(path: str, offset: int, length: int, may_write: WriteGate = unfenced) -> None:
    """Write zeros over a small, possibly unaligned range, durably (that range only);
    OSError (Fenced)."""
    fd = os.open(path, os.O_RDWR)
    try:
        _write_zeros(fd, offset, length, may_write)
    finally:
        os.close(fd)


_SYNC_RANGE = 0x1 | 0x2 | 0x4  # SYNC_FILE_RANGE_WAIT_BEFORE | WRITE | WAIT_AFTER
_SYNC_WRITE = 0x2  # SYNC_FILE_RANGE_WRITE: start write-back, wait for nothing
_COPY_CHUNK = 4 << 20
# a durable copy of a range up to this size is written with RWF_DSYNC at once (one write
# that is its own flush), not written, written back (sync_file_range) and settled with a
# rewrite of its first block (the same block written twice, two device round trips): a
# write fault's copy of the blocks it touches. 4 KiB, measured on the 2-core VM under
# load (load average 11): 423 us p50 against 932 us
_DSYNC_COPY_MAX = 256 << 10


def copy_ranges(copies: list[tuple[str, int, str, int, int]],
                may_write: WriteGate = unfenced, durable: bool = True,
                writeback: bool = False) -> None:
    """Copy (src path, src offset, dst path, dst offset, length) ranges, durably
    (durable=False: written only, in the page cache, write-back started if writeback
    (the copier's copies: sync_file_range WRITE per chunk, no wait); ``settle_ranges`` over the
    destinations makes them durable later, as a write fault's copies are before
    their mark may be: docs/movement.md, "Durable at fsync"; the copier settles a
    batch with ``settle_held``).

    For moving a segment's blocks between containers (docs/movement.md): the copy
    must be on stable storage before its blocks are marked as living at the new place.
    A durable range of at most _DSYNC_COPY_MAX bytes (a write fault's blocks) is read
    and written with RWF_DSYNC, its own flush (_copy_dsync). Any other destination
    range is written (copy_file_range between regular files, else
    pread/pwrite), written back with sync_file_range over that range only, and then
    settled with one 4 KiB RWF_DSYNC rewrite of its first block (as in zero_ranges),
    which commits the file system's journal or flushes the device's cache: never an
    fdatasync of the whole container, which would write back other agents' dirty data.
    may_write is asked before each chunk (_COPY_CHUNK bytes at most) and before the
    settling write, so a copy whose controller may no longer write stops between chunks
    (the fault point ``storage.copy_chunk`` is hit just before that check).
    Raises OSError (EIO on a short read: the table says the source holds the bytes;
    Fenced where may_write said no).
    """
    fds: dict[tuple[str, int], int] = {}

    def fd(path: str, flags: int) -> int:
        key = (path, flags)
        if key not in fds:
            fds[key] = os.open(path, flags | os.O_CLOEXEC)
        return fds[key]

    try:
        for src, soff, dst, doff, length in copies:
            sfd, dfd = fd(src, os.O_RDONLY), fd(dst, os.O_RDWR)
            if durable and 0 < length <= _DSYNC_COPY_MAX:
                _copy_dsync(sfd, src, soff, dfd, dst, doff, length, may_write)
                continue
            done = 0
            use_cfr = stat.S_ISREG(os.fstat(sfd).st_mode) and stat.S_ISREG(
                os.fstat(dfd).st_mode)
            while done < length:
                n = min(_COPY_CHUNK, length - done)
                got = 0
                faultpoints.hit("storage.copy_chunk")
                gate(may_write, f"a copy at {doff + done}", dst)
                if use_cfr:
                    try:
                        got = os.copy_file_range(sfd, dfd, n, soff + done, doff + done)
                    except OSError as e:
                        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS,
                                           errno.EOPNOTSUPP):
                            raise
                        use_cfr = False
                if not got:
                    data = os.pread(sfd, n, soff + done)
                    if not data:
                        raise OSError(errno.EIO, f"short read of {src} at {soff + done}")
                    view = memoryview(data)
                    pos = doff + done
                    gate(may_write, f"a copy at {pos}", dst)  # the pread may have waited
                    while view:
                        w = os.pwrite(dfd, view, pos)
                        view, pos = view[w:], pos + w
                    got = len(data)
                if writeback and not durable:
                    # start writing the chunk back now (not waiting for it): the batch's
                    # one flush then finds little dirty, and neither does any fdatasync
                    # of the container meanwhile (a lazy mark's, an agent's fsync)
                    sync_file_range(dfd, doff + done, got, _SYNC_WRITE)
                done += got
            if durable:
                _settle_one(dfd, dst, [(doff, length)], may_write)
    finally:
        for f in fds.values():
            os.close(f)


def _copy_dsync(sfd: int, src: str, soff: int, dfd: int, dst: str, doff: int,
                length: int, may_write: WriteGate) -> None:
    """Copy one small range durably: read it, then write it with RWF_DSYNC (the write
    is its own range-limited flush: it writes back and waits for exactly these bytes,
    then commits the file system's journal or flushes the device's cache). OSError
    (EIO on a short read; Fenced)."""
    faultpoints.hit("storage.copy_chunk")
    data = os.pread(sfd, length, soff)
    while len(data) < length:
        more = os.pread(sfd, length - len(data), soff + len(data))
        if not more:
            raise OSError(errno.EIO, f"short read of {src} at {soff + len(data)}")
        data += more
    view = memoryview(data)
    pos = doff
    while view:
        gate(may_write, f"a copy at {pos}", dst)
        w = os.pwritev(dfd, [view], pos, os.RWF_DSYNC)
        view, pos = view[w:], pos + w


def _settle_one(fd: int, path: str, ranges: list[tuple[int, int]],
                may_write: WriteGate, at: int | None = None) -> None:
    """Write back ranges of one open file (sync_file_range over each only), then one
    RWF_DSYNC rewrite of the block at byte offset at (default: the first range's first
    block; what is there is read and written back as it is): it commits the file
    system's journal or flushes the device's cache for all of them at once. Nobody may
    write that block meanwhile."""
    for off, length in ranges:
        sync_file_range(fd, off, length, _SYNC_RANGE)
    if at is None:
        off, length = ranges[0]
        first = os.pread(fd, min(length, P.BLOCK_SIZE), off)
    else:
        off = at
        first = os.pread(fd, P.BLOCK_SIZE, at)
    gate(may_write, f"settling copies at {off}", path)
    os.pwritev(fd, [first], off, os.RWF_DSYNC)


def settle_ranges(ranges: list[tuple[str, int, int]]) -> None:
    """Make (path, offset, length) ranges written earlier (copy_ranges with
    durable=False) durable: one fdatasync per file, for any number of its ranges.

    Not copy_ranges' settling rewrite of a block: these ranges were answered to their
    writer before they are settled, so its write may be landing there now, and a
    rewrite of what was read before it would undo it. The fdatasync also writes back
    other dirty data of the container in this host's page cache (the writer's own
    fsync writes it back anyway). No write gate: an fdatasync writes nothing new.
    Raises OSError.
    """
    paths = sorted({path for path, _off, length in ranges if length > 0})
    for path in paths:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)


def settle_held(path: str, ranges: list[tuple[int, int]], at: int,
                may_write: WriteGate = unfenced) -> None:
    """Make ranges ((offset, length) bytes) of the container at path durable, copied
    there earlier with copy_ranges(durable=False): each is written back with
    sync_file_range, then one 4 KiB RWF_DSYNC rewrite of the block at byte offset at
    settles them all (as in zero_ranges: it commits the file system's journal or flushes
    the device's cache, covering every write-back that completed before it). So a batch
    of copies costs one flush, not one each.

    The caller must hold the block at `at` against every writer (the copier holds it
    like a copy step: a write fault there waits) and it must hold data a copy put
    there: it is read and written back as it is. Raises OSError (Fenced where may_write
    said no)."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        _settle_one(fd, path, ranges, may_write, at)
    finally:
        os.close(fd)
