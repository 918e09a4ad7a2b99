"""ContainerIO's sync debts and poisoned containers, on plain files (no mount).

The fdatasync calls are counted by wrapping os.fdatasync; the real-mount tests in
test_agent_durability.py observe the syscalls themselves with strace.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from virtfs.blockio import ContainerError, ContainerIO


@pytest.fixture
def synced(monkeypatch):
    """The fds os.fdatasync was called on, in order; fail.add(fd) makes the next call on
    that fd fail with EIO (once)."""
    calls: list[int] = []
    fail: set[int] = set()
    real = os.fdatasync

    def fake(fd: int) -> None:
        calls.append(fd)
        if fd in fail:
            fail.discard(fd)
            raise OSError(errno.EIO, "injected")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fake)
    return calls, fail


async def two_containers(tmp_path: Path) -> ContainerIO:
    io = ContainerIO()
    for lun in (1, 2):
        p = tmp_path / f"c{lun}.img"
        p.write_bytes(bytes(1 << 16))
        io.set_paths({lun: str(p)})
        await io.open(lun)
    return io


async def test_debts_belong_to_the_disk_and_are_paid_once(tmp_path, synced):
    calls, _ = synced
    io = await two_containers(tmp_path)
    io.pwrite(1, 0, b"a" * 4096, 7)  # disk 7 -> LUN 1
    io.pwrite(2, 0, b"b" * 4096, 8)  # disk 8 -> LUN 2
    await io.sync(9)  # a disk that wrote nothing
    assert calls == []
    await io.sync(7)
    assert calls == [io._fds[1]]
    await io.sync(7)  # paid
    assert calls == [io._fds[1]]
    await io.sync(8)
    assert calls == [io._fds[1], io._fds[2]]
    io.close()


async def test_a_forgotten_disks_debts_are_paid_by_any_sync(tmp_path, synced):
    calls, _ = synced
    io = await two_containers(tmp_path)
    io.pwrite(1, 0, b"a" * 4096, 7)
    io.forget_disk(7)  # renamed elsewhere: nobody knows its new key
    await io.sync(8)
    assert calls == [io._fds[1]]
    io.close()


async def test_a_failed_sync_poisons_the_container(tmp_path, synced):
    calls, fail = synced
    io = await two_containers(tmp_path)
    io.pwrite(1, 0, b"x" * 4096, 5)
    await io.sync(5)  # disk 5's write is durable before the failure
    io.pwrite(1, 4096, b"a" * 4096, 7)
    io.pwrite(1, 8192, b"c" * 4096, 9)
    io.pwrite(2, 0, b"b" * 4096, 8)
    fail.add(io._fds[1])
    for disk in (7, 7, 9):  # every disk that owed LUN 1 writes, every time
        with pytest.raises(ContainerError) as ei:
            await io.sync(disk)
        assert ei.value.errno == errno.EIO
    assert calls.count(io._fds[1]) == 2  # the one that failed (and disk 5's good one)
    io.pwrite(1, 0, b"d" * 4096, 7)  # written after the failure: still not durable
    with pytest.raises(ContainerError):
        await io.sync(7)
    await io.sync(5)  # nothing owed since its good sync
    await io.sync(8)  # another container
    assert calls[-1] == io._fds[2]
    io.close()


async def test_a_path_change_keeps_the_old_fd_until_synced(tmp_path, synced):
    calls, _ = synced
    io = await two_containers(tmp_path)
    io.pwrite(1, 0, b"a" * 4096, 7)
    old = io._fds[1]
    moved = tmp_path / "moved.img"
    moved.write_bytes(bytes(1 << 16))
    io.set_paths({1: str(moved)})
    assert not io.is_open(1)
    await io.sync(7)
    assert calls == [old]  # the writes went to the old file: that is what gets synced
    io.close()


async def test_a_container_whose_label_is_not_the_named_one_is_refused(tmp_path):
    """docs/labels.md: the agent checks a container's label before its first I/O on it,
    and again whenever the controller names another label for the LUN."""
    from controller import label as L

    p = tmp_path / "c1.img"
    p.write_bytes(bytes(1 << 16))
    ours = L.Label(L.new_id(), L.new_id(), 1 << 16, 1, "c1", 0.0)
    beat = L.Beat(ours.installation, L.new_id(), 1, 0.0, 2.0, 10.0)
    want = {1: (ours.installation, ours.container)}
    io = ContainerIO()
    io.set_paths({1: str(p)}, want)
    with pytest.raises(ContainerError, match="label missing"):
        await io.open(1)
    L.write_label(str(p), ours, beat)
    io.set_paths({1: str(p)}, want)  # the same label: the refusal stands for a while
    with pytest.raises(ContainerError):
        await io.open(1)
    io._refused.clear()
    await io.open(1)  # now it is there
    io.pwrite(1, 8192, b"x" * 4096, 7)
    # another installation's label, and the controller names it for the LUN: refused
    theirs = L.Label(L.new_id(), L.new_id(), 1 << 16, 3, "theirs", 0.0)
    L.write_label(str(p), theirs, beat)
    io.set_paths({1: str(p)}, {1: (ours.installation, L.new_id())})
    with pytest.raises(ContainerError, match="label claimed by installation "
                       + theirs.installation[:12]):
        await io.open(1)
    # a controller from before labels names none: no check
    io2 = ContainerIO()
    io2.set_paths({1: str(p)})
    await io2.open(1)
    io2.close()
    io.close()
