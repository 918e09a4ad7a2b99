"""Containers shared between hosts (docs/fencing.md): agents do their I/O with O_DIRECT,
so the host page cache holds nothing of them that a fenced host could write back."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
from pathlib import Path

import pytest
from rig import FIO_VERIFY, add_container, agent, fio, vd

from controller.protocol import LABEL_BYTES


def cached_pages(path: Path, start: int) -> int:
    """Pages of path from byte start (page-aligned) on that are in the host page cache:
    mincore(2) over a read-only mapping (mapping a file reads nothing in)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size - start
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        try:
            vec = (ctypes.c_ubyte * (-(-size // mmap.PAGESIZE)))()
            assert libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
            return sum(b & 1 for b in vec)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "page-cache"])
def test_a_shared_container_leaves_nothing_in_the_page_cache(controller, mount_factory,
                                                             tmp_path, shared):
    img = tmp_path / "c1.img"
    add_container(controller, "c1", img, "256M")
    if shared:
        r = vd(controller, "container", "set", "c1", "--shared", "--format", "json").json()
        assert r["shared"] is True
    # thick: the controller's own zeroing is done (and dropped below) before the I/O
    vd(controller, "disk", "create", "d", "--size", "32M", "--thick")
    m = agent(mount_factory, controller)
    drop(img)
    # buffered writes of every size and alignment, then a verify pass, through the mount
    fio(m.path / "d", *FIO_VERIFY, "--size=16M", "--bsrange=512-64k", "--randseed=7",
        "--norandommap", "--bs_unaligned=1")
    # the data region (past the label's MiB, where the controller beats its heartbeat)
    pages = cached_pages(img, LABEL_BYTES)
    if shared:
        assert pages == 0, pages
    else:
        assert pages > 0, pages  # the oracle sees the page cache when it is used


def test_fsx_style_model_through_a_container_made_shared_while_open(controller,
                                                                    mount_factory, tmp_path):
    """Sub-block writes (read-modify-write), reads and truncates against a bytearray,
    across the switch from the page cache to O_DIRECT while the file is open."""
    import random

    img = tmp_path / "c1.img"
    add_container(controller, "c1", img, "64M")
    vd(controller, "disk", "create", "d", "--size", "1M", "--segment-size", "64K")
    m = agent(mount_factory, controller)
    rnd = random.Random(11)
    model = bytearray(1 << 20)
    fd = os.open(m.path / "d", os.O_RDWR)
    try:
        for step in range(1500):
            if step == 500:
                vd(controller, "container", "set", "c1", "--shared")
            if step == 1000:
                vd(controller, "container", "set", "c1", "--no-shared")
                vd(controller, "container", "set", "c1", "--shared")
            off = rnd.randrange(0, (1 << 20) - 9000)
            n = rnd.randrange(1, 9000)
            if rnd.random() < 0.5:
                data = rnd.randbytes(n)
                assert os.pwrite(fd, data, off) == n
                model[off:off + n] = data
            else:
                assert os.pread(fd, n, off) == bytes(model[off:off + n]), (step, off, n)
        os.fsync(fd)
    finally:
        os.close(fd)
    drop(img)
    with open(m.path / "d", "rb") as f:
        assert f.read() == bytes(model)
    info = json.loads(vd(controller, "container", "info", "c1", "--format", "json").out)
    assert info["shared"] is True
    assert re.search(r"shared: +yes", vd(controller, "container", "info", "c1").out)
