"""O_DIRECT reads and writes of any range, for containers shared between hosts.

A shared container (``container add --shared``; docs/fencing.md) is opened with
O_DIRECT, so the agent's writes never sit in the host page cache where a host
fenced by its lease could still write them back later. O_DIRECT needs offsets,
lengths and buffers aligned to the device's logical block: these functions use
4 KiB (BLOCK) and page-aligned buffers (an anonymous mmap), and a write that
does not cover whole blocks reads the blocks it touches first and writes them
back whole (read-modify-write). The caller runs them on the agent's event loop,
one at a time, which makes each read-modify-write atomic within this agent (the
block lock); two hosts writing different bytes of one 4 KiB block of one disk at
once can still lose one of them, as with any shared disk below a sector size.
"""

from __future__ import annotations

import errno
import mmap
import os

BLOCK = 4096


def _span(offset: int, length: int) -> tuple[int, int]:
    """The whole blocks [start, end) that bytes [offset, offset+length) touch."""
    return offset - offset % BLOCK, -(-(offset + length) // BLOCK) * BLOCK


def _read_into(fd: int, view: memoryview, pos: int) -> int:
    """Fill view (block-aligned, inside an mmap) from pos; the bytes read (short only at
    the end of the file: the rest stays as it was, zeros in a fresh mmap)."""
    got = 0
    while got < len(view):
        k = os.preadv(fd, [view[got:]], pos + got)
        if k == 0:
            break
        got += k
    return got


def pread(fd: int, offset: int, length: int) -> bytes:
    """length bytes at offset of an O_DIRECT fd; EIO if the file ends first."""
    start, end = _span(offset, length)
    with mmap.mmap(-1, end - start) as buf:
        view = memoryview(buf)
        try:
            got = _read_into(fd, view, start)
            if got < offset - start + length:
                raise OSError(errno.EIO, f"short read at {start + got}")
            return bytes(view[offset - start : offset - start + length])
        finally:
            view.release()


def pwrite(fd: int, offset: int, data: bytes | memoryview) -> None:
    """Write all of data at offset of an O_DIRECT fd, reading the partial blocks at
    either end first (read-modify-write)."""
    n = len(data)
    start, end = _span(offset, n)
    size = end - start
    with mmap.mmap(-1, size) as buf:
        view = memoryview(buf)
        try:
            if start < offset:  # the first block is partial: read it
                _read_into(fd, view[:BLOCK], start)
            if offset + n < end and (size > BLOCK or start == offset):
                _read_into(fd, view[size - BLOCK :], end - BLOCK)  # the last one
            view[offset - start : offset - start + n] = data
            done = 0
            while done < size:
                done += os.pwritev(fd, [view[done:]], start + done)
        finally:
            view.release()
