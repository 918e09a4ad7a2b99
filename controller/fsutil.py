"""File-system helpers shared by the controller, the agent and vdctl.

Durable writes (``fsync_dir``, ``write_all``, ``write_atomic``) follow the usual
POSIX recipe: data is durable once fsync(2) of the file returns, and a new or
renamed name once fsync(2) of its directory returns (fsync(2), rename(2)).

``mounts`` parses /proc/self/mountinfo (proc(5)). Nothing here stats a mount
point, so the agent may call it for its own mount without waiting on itself.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass


def fsync_dir(path: str) -> None:
    """fsync(2) the directory path, so names created or renamed in it are durable.

    Raises OSError as os.open/os.fsync do.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte of data to fd (os.write may write less than asked). Raises OSError."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_atomic(path: str, data: bytes) -> None:
    """Replace path with data: tmp -> fsync -> rename -> fsync(dir). Blocking.

    A crash leaves either the old file or the new one, never a mix. Raises OSError.
    """
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo: the device, where it is mounted, what it is."""

    major: int
    minor: int
    mountpoint: str  # unescaped
    fstype: str
    source: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo (octal), proc(5)
    out = []
    i = 0
    while i < len(field):
        c = field[i]
        if c == "\\" and field[i + 1:i + 4].isdigit() and len(field[i + 1:i + 4]) == 3:
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(c)
            i += 1
    return "".join(out)


def mounts(path: str = "/proc/self/mountinfo") -> Iterator[Mount]:
    """The mounts of this process's namespace, in mountinfo's order (the topmost last).

    Raises OSError if the file cannot be read; malformed lines are skipped.
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            try:
                sep = fields.index("-", 6)
                major, minor = fields[2].split(":")
                yield Mount(int(major), int(minor), _unescape(fields[4]),
                            fields[sep + 1], fields[sep + 2])
            except (ValueError, IndexError):
                continue


def mount_at(mountpoint: str) -> Mount | None:
    """The topmost mount at mountpoint (the last matching line), or None. Raises OSError."""
    found = None
    for m in mounts():
        if m.mountpoint == mountpoint:
            found = m
    return found
