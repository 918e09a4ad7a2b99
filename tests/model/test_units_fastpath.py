"""The data path's fast path (virtfs/datapath.py: plain, fast_read, fast_write): one
lookup in the live table and one pread/pwrite for a plain entry under a valid lease;
None (the general path) for everything else, the moment the table or lease says so."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from controller.protocol import INVALID, NO_LUN, NOWRITE, ZERO
from virtfs.agent import Session
from virtfs.blockio import ContainerIO
from virtfs.datapath import DataPath, fast_path_wanted
from virtfs.kernel import KernelCache
from virtfs.mapcache import DiskTable
from virtfs.opendisk import OpenDisk
from virtfs.tables import TableUpdate

SEG = 64 << 10
LUN = 3


class FakeSession:
    """What the data path asks of a session: the lease, and background tasks."""

    def __init__(self) -> None:
        self.lease = 10.0
        self.valid = True
        self.spawned: list[Callable[[], Any]] = []

    def lease_valid(self) -> bool:
        return self.valid

    def start_soon(self, fn: Callable[[], Any]) -> None:
        self.spawned.append(fn)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[DataPath, OpenDisk, FakeSession, int]]:
    """A DataPath over one open container (LUN 3, 4 segments of pattern), and a disk
    mapping [0, SEG) and [SEG, 2*SEG) to it, then a nowrite segment and a hole."""
    path = tmp_path / "c.img"
    path.write_bytes(bytes(range(256)) * (4 * SEG // 256))
    session = FakeSession()
    io = ContainerIO()
    fd = os.open(path, os.O_RDWR)
    io.paths[LUN] = str(path)
    io._fds[LUN] = fd
    data = DataPath(cast(Session, session), io, KernelCache())
    data.fast = True
    rows = [[0, SEG, LUN, 0, 0], [SEG, SEG, LUN, SEG, 0], [2 * SEG, SEG, LUN, 2 * SEG, NOWRITE],
            [3 * SEG, SEG, NO_LUN, 0, ZERO]]
    od = OpenDisk("d", 7, DiskTable("d", 4 * SEG, 1, rows, 1), SEG)
    try:
        yield data, od, session, fd
    finally:
        os.close(fd)


def container(fd: int, off: int, n: int) -> bytes:
    return os.pread(fd, n, off)


def test_a_read_in_one_plain_entry_is_served_from_the_container(rig):
    data, od, _, fd = rig
    assert data.fast_read(od, 100, 4096) == container(fd, 100, 4096)
    assert data.fast_read(od, 2 * SEG + 5, 10) == container(fd, 2 * SEG + 5, 10)  # nowrite


def test_what_is_not_one_plain_entry_goes_to_the_general_path(rig):
    data, od, _, _ = rig
    assert data.fast_read(od, SEG - 10, 20) is None  # two entries
    assert data.fast_read(od, 3 * SEG, 10) is None  # a hole
    assert data.fast_read(od, 4 * SEG - 10, 20) is None  # past the end
    assert data.fast_write(od, 2 * SEG, b"x") is None  # nowrite
    assert data.fast_write(od, 3 * SEG, b"x") is None  # a hole: allocate
    assert data.fast_write(od, 4 * SEG, b"x") is None  # grows the disk
    data.io._direct.add(LUN)  # an O_DIRECT (shared) container: aligned buffers
    assert data.fast_read(od, 0, 10) is None


def test_no_container_io_without_a_valid_lease(rig):
    """docs/fencing.md on the fast path: the lease is checked on every request."""
    data, od, session, fd = rig
    before = container(fd, 0, 8)
    session.valid = False
    assert data.fast_read(od, 0, 8) is None
    assert data.fast_write(od, 0, b"B" * 8) is None
    assert container(fd, 0, 8) == before
    session.valid = True
    assert data.fast_write(od, 0, b"B" * 8) == 8
    assert container(fd, 0, 8) == b"B" * 8


def test_a_restriction_stops_the_fast_path_at_once(rig):
    """A restriction or a drain push is applied to the table the fast path reads:
    the next request in the range is not served by it; outside the range it is."""
    data, od, _, _ = rig
    assert data.fast_write(od, SEG, b"a") == 1
    od.table.restrict(SEG, 2 * SEG)
    assert data.fast_write(od, SEG, b"a") is None
    assert data.fast_read(od, SEG, 1) is None
    assert data.fast_read(od, 0, 1) is not None
    # a push that moves [0, SEG) elsewhere, invalid until the copy is done (a migration)
    u = TableUpdate.ranged({"start": 0, "end": SEG, "size": 4 * SEG, "epoch": 2, "v": 2,
                            "rows": [[0, SEG, LUN, 3 * SEG, INVALID]], "drain": True})
    data.tables.apply_update(od.table, u)
    assert data.fast_read(od, 0, 1) is None


def test_a_freeze_stops_fast_writes_at_once_and_reads_go_on(rig):
    """A "freeze" push (a snapshot being taken) fences the table in O(1) (DiskTable.fence):
    every entry held then is nowrite, so a fast write must fall to the general path
    (which faults, and copies on write) while reads stay fast; an entry installed after
    the freeze is as sent."""
    data, od, _, fd = rig
    assert data.fast_write(od, 0, b"a") == 1
    od.table.fence(None)
    before = container(fd, 8, 1)
    assert data.fast_write(od, 8, b"b") is None
    assert container(fd, 8, 1) == before  # nothing reached the container
    assert data.fast_read(od, 0, 4096) == container(fd, 0, 4096)
    od.table.replace(0, SEG, [[0, SEG, LUN, 0, 0]])  # newer than the freeze
    assert data.fast_write(od, 8, b"b") == 1


def test_a_fast_write_owes_a_sync_and_counts_as_a_write(rig):
    data, od, _, fd = rig
    assert data.fast_write(od, 10, b"hello") == 5
    assert container(fd, 10, 5) == b"hello"
    assert data.io.unsynced() == {LUN: 1}
    assert od.times.dirty and od.run.end == 15


def test_the_switch(monkeypatch):
    monkeypatch.delenv("VIRTFS_FAULTS", raising=False)
    monkeypatch.delenv("VIRTFS_FASTPATH", raising=False)
    assert fast_path_wanted() and not fast_path_wanted(False)
    monkeypatch.setenv("VIRTFS_FASTPATH", "0")
    assert not fast_path_wanted()
    monkeypatch.setenv("VIRTFS_FASTPATH", "1")
    monkeypatch.setenv("VIRTFS_FAULTS", "blockio.write=eio@1")
    assert not fast_path_wanted()


class BrokenFast:
    """A data path whose fast path has a bug; its general path answers."""

    def __init__(self) -> None:
        self.fast = True

    def fast_read(self, od: object, off: int, size: int) -> bytes:
        raise ZeroDivisionError("a bug")

    fast_write = fast_read

    async def read(self, od: object, off: int, size: int) -> bytes:
        return b"general"

    async def write(self, od: object, off: int, buf: bytes) -> int:
        return len(buf)


def test_a_bug_in_the_fast_path_turns_it_off_and_the_request_is_served(caplog):
    import trio

    from virtfs.fuse_ops import Operations

    ops = Operations.__new__(Operations)  # only what read and write use
    ops.v = cast(Any, SimpleNamespace(data=BrokenFast()))
    ops.handles = {1: (cast(OpenDisk, None), True)}
    assert trio.run(ops.read, 1, 0, 7) == b"general"
    assert not ops.v.data.fast
    assert "fast path (read); it is off" in caplog.text
    ops.v.data.fast = True
    assert trio.run(ops.write, 1, 0, b"abc") == 3
    assert not ops.v.data.fast
