"""The agent's session and model under trio, without a FUSE mount (issue 6, items 3-5).

Heartbeats against a real in-process controller; the model (Volumes) and the
FUSE adapter against a scripted fake session whose answers the test controls.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio
import trio.testing

from controller.client import open_controller
from controller.daemon import open_controller_service
from controller.protocol import INVALID, NO_LUN, ZERO
from controller.statedir import default_socket
from virtfs.agent import Session
from virtfs.blockio import ContainerIO
from virtfs.disks import Volumes
from virtfs.errors import DiskError
from virtfs.fuse_ops import Operations
from virtfs.mapcache import TableError

# ---------------------------------------------------------------- heartbeats (item 4)

LEASE = 2.0  # seconds; heartbeats every third of it


async def _make_disk(addr: str, tmp_path: Path) -> None:
    async with open_controller(addr, role="admin", name="test") as admin:
        await admin.call("container.add", name="c1", path=str(tmp_path / "c1.img"),
                         size=64 << 20)
        await admin.call("disk.create", name="d", size=1 << 20, thick=False,
                         segment_size=None, container=None)


async def _run_session_with(tmp_path: Path, on_push: Callable[[dict[str, Any]], Awaitable[None]],
                            seconds: float) -> tuple[Session, int]:
    """An in-process controller (lease LEASE) and a session with disk d open and on_push as
    its push handler, for seconds; returns the session and how many times its lease was
    found expired meanwhile (sampled every 50 ms)."""
    state = tmp_path / "state"
    state.mkdir()
    async with open_controller_service(str(state), lease=LEASE):
        addr = default_socket(str(state))
        await _make_disk(addr, tmp_path)
        session = Session(addr, str(tmp_path / "mnt"), call_timeout=5.0)
        session.on_push = on_push
        expired = 0
        async with trio.open_nursery() as nursery:
            await nursery.start(session.run)
            await session.call("disk.open", name="d")  # heartbeats now report its epoch
            end = trio.current_time() + seconds
            while trio.current_time() < end:
                expired += not session.lease_valid()
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    return session, expired


async def test_slow_epoch_handling_does_not_stop_heartbeats(tmp_path):
    """A table reload slower than the lease (here: forever) must not hold up heartbeats."""
    seen: list[dict[str, Any]] = []

    async def on_push(msg: dict[str, Any]) -> None:
        if msg.get("push") == "epochs":
            seen.append(msg)
            await trio.sleep_forever()

    session, expired = await _run_session_with(tmp_path, on_push, 2.5 * LEASE)
    assert seen, "no heartbeat carried the open disk's epoch: the test proves nothing"
    assert expired == 0, "the lease ran out while an epoch handler was busy"
    assert session.reconnects == 1, "the controller dropped the agent"


async def test_table_error_in_epoch_handling_does_not_end_the_session(tmp_path):
    """An exception from the epoch handler (a bad table) is logged; the session goes on."""
    seen: list[dict[str, Any]] = []

    async def on_push(msg: dict[str, Any]) -> None:
        if msg.get("push") == "epochs":
            seen.append(msg)
            raise TableError("rows do not tile the disk")

    session, expired = await _run_session_with(tmp_path, on_push, 1.5 * LEASE)
    assert len(seen) >= 3, "the session stopped heartbeating after the first error"
    assert expired == 0
    assert session.reconnects == 1


# ---------------------------------------------------------------- a scripted session


def table(name: str, size: int = 8192, epoch: int = 1, v: int = 1,
          rows: Any = None) -> dict[str, Any]:
    """A disk.open / disk.table answer: a hole of size bytes."""
    return {"name": name, "size": size, "epoch": epoch, "segment_size": 4096, "v": v,
            "containers": {}, "rows": rows if rows is not None else [[0, size, NO_LUN, 0, ZERO]]}


class FakeSession:
    """Stands in for agent.Session: call() runs the test's script; background tasks
    run in the test's nursery."""

    def __init__(self, nursery: trio.Nursery,
                 script: Callable[[str, dict[str, Any]], Awaitable[Any]]):
        self.nursery = nursery
        self.script = script
        self.lease = 1.0
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.on_push: Any = None
        self.on_reconnect: Any = None

    def lease_valid(self) -> bool:
        return True

    def start_soon(self, fn: Callable[[], Awaitable[None]]) -> None:
        self.nursery.start_soon(fn)

    async def call(self, op: str, *, timeout: float | None = None, retry: bool = True,
                   **args: Any) -> Any:
        self.calls.append((op, args))
        return await self.script(op, args)


def volumes(session: FakeSession) -> Volumes:
    return Volumes(session, ContainerIO())  # type: ignore[arg-type]


def all_invalid(od: Any) -> bool:
    return all(e.flags & INVALID for e in od.table)


# ---------------------------------------------------------------- epoch reloads (item 4)


async def test_epoch_reload_runs_in_background_coalesced_and_restricts_on_failure():
    """epochs pushes return at once; one reload per disk runs at a time (a second
    request while it runs makes one more after it); a reload that fails (a bad table)
    restricts the whole table, and a later good reload lifts that."""
    release = trio.Event()
    answers: list[Any] = []

    async def script(op: str, args: dict[str, Any]) -> Any:
        if op == "disk.open":
            return table("a")
        if op == "disk.table":
            await release.wait()
            return answers.pop(0)
        raise AssertionError(op)

    async with trio.open_nursery() as nursery:
        s = FakeSession(nursery, script)
        v = volumes(s)
        od = await v.open_disk(v.ns.inode_of("a"))
        with trio.fail_after(1):  # never waits for the reload itself
            for _ in range(5):
                await v.handle_push({"push": "epochs", "epochs": {"a": 2}})
        await trio.testing.wait_all_tasks_blocked()
        assert [op for op, _ in s.calls].count("disk.table") == 1, "not coalesced"
        answers[:] = [table("a", epoch=2, v=2, rows=[[0, 100, NO_LUN, 0, ZERO]]),  # bad
                      table("a", epoch=2, v=3)]
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        # the bad table restricted everything, then the one queued reload fixed it
        assert [op for op, _ in s.calls].count("disk.table") == 2
        assert not all_invalid(od) and od.table.epoch == 2

        # a failing reload with nothing after it leaves the table restricted
        release = trio.Event()
        answers[:] = [table("a", epoch=3, v=4, rows="garbage")]
        await v.handle_push({"push": "epochs", "epochs": {"a": 3}})
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert all_invalid(od)
        nursery.cancel_scope.cancel()


async def test_update_push_with_a_failing_reload_does_not_raise():
    """A bad update push leads to a reload; if that fails too, the table stays
    restricted and the handler returns normally (so the push is still acknowledged)."""
    async def script(op: str, args: dict[str, Any]) -> Any:
        if op == "disk.open":
            return table("a")
        if op == "disk.table":
            raise DiskError(errno.EIO, "controller away")
        raise AssertionError(op)

    async with trio.open_nursery() as nursery:
        v = volumes(FakeSession(nursery, script))
        od = await v.open_disk(v.ns.inode_of("a"))
        await v.handle_push({"push": "update", "disk": "a", "start": 0, "end": 8192,
                             "rows": [[0, 5, NO_LUN, 0, ZERO]], "size": 8192, "epoch": 2,
                             "v": 5})
        assert all_invalid(od)
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- open vs rename (item 5)


@pytest.mark.parametrize("answer_name", ["a", "b"])
async def test_open_overtaken_by_a_rename_push(answer_name):
    """disk.open("a") is in flight when the rename push a -> b arrives: the disk must be
    installed as "b", so a later update push for "b" is applied, not dropped."""
    in_open = trio.Event()
    answer = trio.Event()

    async def script(op: str, args: dict[str, Any]) -> Any:
        if op == "disk.open":
            in_open.set()
            await answer.wait()
            return table(answer_name)
        if op == "disk.close":
            return None
        raise AssertionError(op)

    async with trio.open_nursery() as nursery:
        v = volumes(FakeSession(nursery, script))
        ino = v.ns.inode_of("a")
        opened: list[Any] = []

        async def opener() -> None:
            opened.append(await v.open_disk(ino))

        nursery.start_soon(opener)
        await in_open.wait()
        await v.handle_push({"push": "rename", "disk": "a", "new": "b"})
        answer.set()
        await trio.testing.wait_all_tasks_blocked()
        [od] = opened
        assert od.name == "b" and v.ns.open == {"b": od}
        assert v.ns.inodes[ino] == "b" and v.ns.names == {"b": ino}
        await v.handle_push({"push": "update", "disk": "b", "start": 0, "end": 4096,
                             "rows": [[0, 4096, 1, 0, 0]], "size": 8192, "epoch": 2, "v": 2})
        assert od.table.pieces(0, 1)[0].lun == 1, "the update for the new name was dropped"
        # a late duplicate of the rename changes nothing
        await v.handle_push({"push": "rename", "disk": "a", "new": "b"})
        assert v.ns.open == {"b": od} and v.ns.names == {"b": ino}
        nursery.cancel_scope.cancel()


async def test_open_answered_under_a_new_name_without_a_push():
    """The rename happened before the controller counted our open (no push for us):
    the answer's name is the disk's name now."""
    async def script(op: str, args: dict[str, Any]) -> Any:
        assert op == "disk.open"
        return table("b")

    async with trio.open_nursery() as nursery:
        v = volumes(FakeSession(nursery, script))
        ino = v.ns.inode_of("a")
        od = await v.open_disk(ino)
        assert od.name == "b" and v.ns.open == {"b": od} and v.ns.names == {"b": ino}
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- failed opens (item 3)


class FakeVolumes:
    """What fuse_ops needs of Volumes, with a truncate and a getattr that fail."""

    def __init__(self) -> None:
        from virtfs.kernel import KernelCache

        self.kernel = KernelCache()
        self.opened = 0
        self.released = 0
        self.ns = self
        self.inodes: dict[int, str] = {}  # inode -> name (a snapshot's has an '@')

    async def open_disk(self, inode: int) -> Any:
        self.opened += 1
        return object()

    async def release(self, od: Any) -> None:
        self.released += 1

    async def truncate(self, inode: int, size: int) -> None:
        raise DiskError(errno.EIO, "resize refused")

    async def create(self, name: str) -> int:
        return 5

    async def info(self, inode: int) -> Any:
        raise DiskError(errno.EIO, "listing failed")


async def test_open_o_trunc_that_fails_releases_the_disk():
    async with trio.open_nursery() as nursery:
        fv = FakeVolumes()
        ops = Operations(fv, nursery)  # type: ignore[arg-type]
        with pytest.raises(pyfuse3.FUSEError) as ei:
            await ops.open(5, os.O_WRONLY | os.O_TRUNC, None)
        assert ei.value.errno == errno.EIO
        assert (fv.opened, fv.released) == (1, 1)
        assert not ops.handles


async def test_create_that_fails_after_opening_releases_the_disk():
    async with trio.open_nursery() as nursery:
        fv = FakeVolumes()
        ops = Operations(fv, nursery)  # type: ignore[arg-type]
        with pytest.raises(pyfuse3.FUSEError):
            await ops.create(1, b"new", 0o100644, os.O_RDWR, None)
        assert (fv.opened, fv.released) == (1, 1)
        assert not ops.handles


# ---------------------------------------------------------------- grows


async def test_a_write_past_the_end_grows_with_grow_only():
    """A grow asks for "at least size", so a disk another writer made larger meanwhile is
    not an error (and needs no reload: the answer's larger size is the truth)."""
    async def script(op: str, args: dict[str, Any]) -> Any:
        if op == "disk.open":
            return table("a")
        if op == "disk.resize":
            assert args["grow_only"] is True and args["allow_shrink"] is False
            big = 65536  # another writer grew it further than we asked
            return {"update": {"start": 8192, "end": big, "size": big, "epoch": 2, "v": 2,
                               "containers": {}, "rows": [[8192, big - 8192, NO_LUN, 0, ZERO]]}}
        raise AssertionError(op)

    async with trio.open_nursery() as nursery:
        s = FakeSession(nursery, script)
        v = volumes(s)
        od = await v.open_disk(v.ns.inode_of("a"))
        await v.data.sizes.grow(od, 16384)
        assert od.table.size == 65536
        assert [op for op, _ in s.calls] == ["disk.open", "disk.resize"]
        nursery.cancel_scope.cancel()
