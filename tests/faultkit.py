"""Helpers for the fault tests: a standalone controller with agents, O_DIRECT I/O."""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any

from conftest import ControllerProc, Result

SEG = 4 << 20  # the default segment size of a thin disk
BLOCK = 4096


def vd(c: ControllerProc, *args: str) -> Result:
    r = c.vdctl(*args)
    assert r.rc == 0, f"vdctl {' '.join(args)}: {r.err}"
    return r


def add_container(c: ControllerProc, name: str, path: Path, size: str = "2G") -> None:
    vd(c, "container", "add", name, str(path), "--size", size)


def agent(mount_factory: Any, c: ControllerProc, name: str = "m", **kw: Any) -> Any:
    """An agent (virtfs-mount) of the standalone controller c."""
    return mount_factory(name, state_dir=c.state_dir, controller="unix:" + str(c.sock), **kw)


def disk_info(c: ControllerProc, name: str) -> dict[str, Any]:
    return vd(c, "disk", "info", name, "--format", "json").json()


def check_clean(c: ControllerProc) -> None:
    r = c.vdctl("check")
    assert r.rc == 0 and "clean" in r.out, r.out + r.err


def open_direct(path: Path, write: bool = True) -> int:
    return os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_DIRECT)


def dwrite(fd: int, offset: int, data: bytes) -> None:
    """One O_DIRECT pwrite from a page-aligned buffer (offset and size 4096-aligned)."""
    assert offset % BLOCK == 0 and len(data) % BLOCK == 0
    with mmap.mmap(-1, len(data)) as buf:
        buf[:] = data
        n = os.pwrite(fd, buf, offset)
    assert n == len(data), f"short O_DIRECT write: {n} of {len(data)}"


def dread(fd: int, offset: int, length: int) -> bytes:
    """One O_DIRECT pread into a page-aligned buffer."""
    assert offset % BLOCK == 0 and length % BLOCK == 0
    with mmap.mmap(-1, length) as buf:
        n = os.preadv(fd, [buf], offset)
        return bytes(buf[:n])


def read_direct(path: Path, offset: int, length: int) -> bytes:
    fd = open_direct(path, write=False)
    try:
        return dread(fd, offset, length)
    finally:
        os.close(fd)
