"""Space at the pool's end, through a real mount: a sequential writer's allocation
ahead takes what is there, so a thin disk fills its container to the last segment."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest
from rig import (
    SEG,
    add_container,
    agent,
    check_clean,
    disk_info,
    dread,
    dwrite,
    open_direct,
    run,
    vd,
)

from controller.protocol import LABEL_BYTES

MiB = 1 << 20


def sized(data: int) -> str:
    """A container size that holds data bytes (its first block holds its label)."""
    return str(data + LABEL_BYTES)


def write_until_full(fd: int, start: int, stop: int, chunk: int = MiB) -> tuple[int, bytes]:
    """Sequential O_DIRECT writes of chunk bytes from start until stop or ENOSPC; the
    offset reached and the sha256 of what was written."""
    h = hashlib.sha256()
    pos = start
    while pos < stop:
        data = os.urandom(chunk)
        try:
            dwrite(fd, pos, data)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
            break
        h.update(data)
        pos += chunk
    return pos, h.digest()


@pytest.mark.parametrize("where", ["pinned", "pool"])
def test_sequential_writer_fills_the_container_to_the_last_segment(controller, mount_factory,
                                                                   tmp_path, where):
    """A 256M thin disk on 100M of space: a sequential writer's allocation ahead asks for
    more than there is (64M at 64M; 32M at 92M for a second writer after a punch); it
    gets what fits, so the writer stops at 100M exactly, where not even the one segment
    it needs fits. Pinned: one 100M container of two; pool: 60M + 40M."""
    if where == "pinned":
        add_container(controller, "c1", tmp_path / "c1.img", sized(100 * MiB))
        add_container(controller, "big", tmp_path / "big.img", "1G")
        vd(controller, "disk", "create", "d", "--size", "256M", "--container", "c1")
    else:
        add_container(controller, "c1", tmp_path / "c1.img", sized(60 * MiB))
        add_container(controller, "c2", tmp_path / "c2.img", sized(40 * MiB))
        vd(controller, "disk", "create", "d", "--size", "256M")
    m = agent(mount_factory, controller)
    fd = open_direct(m.path / "d")
    try:
        # a first writer: at 64M its window is 64M, more than the 36M free
        reached, _ = write_until_full(fd, 0, 256 * MiB)
        assert reached == 100 * MiB, f"ENOSPC at {reached // MiB}M with space left"
        # at the end not even the one segment a write needs fits: ENOSPC, every time
        for off in (100 * MiB, 200 * MiB):
            with pytest.raises(OSError) as ei:
                dwrite(fd, off, os.urandom(4096))
            assert ei.value.errno == errno.ENOSPC
        first = dread(fd, 0, 32 * MiB)
    finally:
        os.close(fd)
    # give 68M back, then a second writer from 32M on: its window grows 4M, 8M, 16M,
    # 32M (at 92M, with 8M free), and each time takes what fits
    run(["fallocate", "-p", "-o", str(32 * MiB), "-l", str(68 * MiB), str(m.path / "d")])
    assert disk_info(controller, "d")["allocated"] == 32 * MiB
    fd = open_direct(m.path / "d")
    try:
        reached, h2 = write_until_full(fd, 32 * MiB, 256 * MiB)
        assert reached == 100 * MiB, f"ENOSPC at {reached // MiB}M with space left"
        assert dread(fd, 0, 32 * MiB) == first
        assert hashlib.sha256(dread(fd, 32 * MiB, 68 * MiB)).digest() == h2
        assert dread(fd, 100 * MiB, SEG) == bytes(SEG)
    finally:
        os.close(fd)
    assert os.path.ismount(m.path)
    assert disk_info(controller, "d")["allocated"] == 100 * MiB
    rows = {c["name"]: c for c in vd(controller, "container", "ls", "--format", "json").json()}
    assert rows["c1"]["free"] == 0
    if where == "pinned":
        assert rows["big"]["used"] == 0  # a pinned disk never spills over
    check_clean(controller)
