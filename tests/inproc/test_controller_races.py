"""Races between agents and admin operations, against an in-process controller.

Each test widens a real window (a slow punch, a burst of faults) and checks the
outcome the coherence rules promise. All of them failed before their fix.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from controller import storage
from controller.client import open_controller
from controller.daemon import open_controller_service
from controller.protocol import E_BUSY, E_INVALID, LABEL_BYTES, RemoteError
from controller.writegate import WriteGate, unfenced

SEG = 4 << 20


@pytest.fixture
def slow_punch(monkeypatch):
    orig = storage.release_ranges

    def slow(path: str, ranges: list[tuple[int, int]],
             may_write: WriteGate = unfenced) -> None:
        time.sleep(0.3)
        orig(path, ranges, may_write)

    monkeypatch.setattr(storage, "release_ranges", slow)


async def test_rename_during_discard_lifts_the_restriction(tmp_path, slow_punch):
    async with open_controller_service(str(tmp_path / "s"), lease=2.0) as svc:
        await svc.container_add("c1", str(tmp_path / "c1.img"), 64 << 20)
        await svc.disk_create("x", 16 << 20, True, None, None)
        async with trio.open_nursery() as n:
            n.start_soon(svc.disk_discard, "x", 0, SEG)
            await trio.sleep(0.1)
            await svc.disk_rename("x", "y", False)
        assert svc.coherence._restricted == {}
        rows = svc.coherence.rows(svc.state.disks["y"], 0, 16 << 20)
        assert all(not r[4] & 4 for r in rows), rows  # nothing left invalid


async def test_open_during_rm_is_refused(tmp_path, slow_punch):
    state = str(tmp_path / "s")
    addr = f"unix:{state}/controller.sock"
    async with open_controller_service(state, lease=3.0) as svc:
        await svc.container_add("c1", str(tmp_path / "c1.img"), (4 << 20) + LABEL_BYTES)
        await svc.disk_create("x", 4 << 20, True, None, None)
        async with open_controller(addr, role="agent") as ag, open_controller(addr) as adm:
            await ag.call("agent.register", name="a", host="h", mount="/m")
            res: dict[str, Any] = {}

            async def rm() -> None:
                try:
                    res["rm"] = await adm.call("disk.rm", name="x")
                except RemoteError as e:
                    res["rm_err"] = e.code

            async def opener() -> None:
                await trio.sleep(0.1)  # inside rm's punch
                try:
                    res["open"] = await ag.call("disk.open", name="x")
                except RemoteError as e:
                    res["open_err"] = e.code

            async with trio.open_nursery() as n:
                n.start_soon(rm)
                n.start_soon(opener)
            assert not ("rm" in res and "open" in res), res  # never both
            assert (await adm.call("check"))["ok"]


async def test_acks_are_not_stuck_behind_a_burst_of_faults(tmp_path):
    """Agent A's ack must get through while 64 of A's faults wait for a disk lock."""
    state = str(tmp_path / "s")
    addr = f"unix:{state}/controller.sock"
    async with open_controller_service(state, lease=3.0) as svc:
        await svc.container_add("c1", str(tmp_path / "c1.img"), 1 << 30)
        await svc.disk_create("d", 100 * SEG, False, None, None)
        box: dict[str, Any] = {"errs": []}
        async with trio.open_nursery() as nn:

            async def fault(name: str, seg: int) -> None:
                try:
                    await box[name].call("disk.fault", name="d", offset=seg * SEG,
                                         length=4096, write=True, timeout=30)
                except Exception as e:
                    box["errs"].append(repr(e))

            def pusher(name: str) -> Any:
                async def on_push(msg: dict[str, Any]) -> None:
                    async def ack() -> None:
                        if name == "A":
                            for i in range(64):  # a burst that queues on the disk lock
                                nn.start_soon(fault, "A", 10 + i)
                            await trio.sleep(0.05)
                        await box[name].call("agent.ack", pid=msg["pid"], timeout=20)
                    nn.start_soon(ack)
                return on_push

            async with open_controller(addr, role="agent", on_push=pusher("A")) as a, \
                    open_controller(addr, role="agent", on_push=pusher("B")) as b:
                box["A"], box["B"] = a, b
                for c in (a, b):
                    await c.call("agent.register", name="x", host="h", mount="/m")
                    await c.call("disk.open", name="d")
                t0 = trio.current_time()
                await b.call("disk.fault", name="d", offset=0, length=4096, write=True)
                took = trio.current_time() - t0
                await trio.sleep(0.5)
                ls = await b.call("agent.ls")
                nn.cancel_scope.cancel()
        assert took < 2.0, f"B's allocating fault waited {took:.1f} s for A's ack"
        assert [a["connected"] for a in ls] == [True, True]
        assert box["errs"] == []


class _Conn:
    """Stands in for an agent's connection in direct Service calls."""

    def __init__(self, agent: Any):
        self.agent = agent


async def test_freed_space_is_punched_before_it_can_be_reused(tmp_path, slow_punch):
    """A discard's punch must never hit space a concurrent fault was given (and wrote)."""

    async with open_controller_service(str(tmp_path / "s")) as svc:
        img = str(tmp_path / "c.img")
        await svc.container_add("c", img, LABEL_BYTES + 4096)  # one block: any reuse is x's
        await svc.disk_create("x", 1 << 20, False, 4096, None)
        await svc.disk_create("y", 1 << 20, False, 4096, None)

        async def send(msg: dict[str, Any]) -> None:
            return None

        conn = _Conn(svc.agents.register("fake", "h", "/m", send))
        await svc.disk_fault("x", 0, 4096, True, conn)
        got: dict[str, Any] = {}

        async def write_y() -> None:
            await trio.sleep(0.1)  # while x's block is being punched
            try:
                r = await svc.disk_fault("y", 0, 4096, True, conn)
            except RemoteError as e:
                got["err"] = e.code  # no space until the free is recorded: fine
                return
            row = r["rows"][0]
            fd = os.open(img, os.O_RDWR)
            os.pwrite(fd, b"Y" * 4096, row[3])
            os.fsync(fd)
            os.close(fd)
            got["row"] = row

        async with trio.open_nursery() as n:
            n.start_soon(svc.disk_discard, "x", 0, 4096, conn)
            n.start_soon(write_y)
        if "row" in got:
            fd = os.open(img, os.O_RDONLY)
            try:  # the punch did not land after the write
                assert os.pread(fd, 4096, got["row"][3]) == b"Y" * 4096
            finally:
                os.close(fd)
        assert (await svc.check())["ok"]


async def test_concurrent_fsync_waits_for_a_sync_that_covers_it(tmp_path, monkeypatch):

    from virtfs import blockio

    p = tmp_path / "f.img"
    p.write_bytes(bytes(1 << 20))
    real = os.fdatasync

    def slow(fd: int) -> None:
        time.sleep(0.4)
        real(fd)

    monkeypatch.setattr(blockio.os, "fdatasync", slow)
    io = blockio.ContainerIO()
    io.set_paths({1: str(p)})
    await io.open(1)
    io.pwrite(1, 0, b"A" * 4096, disk=7)
    done: dict[str, float] = {}
    t0 = trio.current_time()

    async def fsync(name: str, delay: float) -> None:
        await trio.sleep(delay)
        await io.sync(7)
        done[name] = trio.current_time() - t0

    async with trio.open_nursery() as n:
        n.start_soon(fsync, "first", 0)
        n.start_soon(fsync, "second", 0.05)  # its write is covered by the running sync
    assert done["second"] >= 0.35, done  # it did not return before that sync finished
    io.close()


@pytest.fixture
def slow_thick_zeroing(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Zeroing for a thick disk (preallocate) blocks until the returned event is set."""
    release = threading.Event()
    orig = storage.zero_ranges

    def zero(path: str, ranges: list[tuple[int, int]], preallocate: bool = False,
             may_write: WriteGate = unfenced) -> None:
        if preallocate:
            release.wait(30)
        orig(path, ranges, preallocate, may_write)

    monkeypatch.setattr(storage, "zero_ranges", zero)
    return release


async def test_slow_zeroing_holds_no_other_fault(tmp_path: Path,
                                                 slow_thick_zeroing: threading.Event) -> None:
    state = str(tmp_path / "s")
    addr = f"unix:{state}/controller.sock"
    async with open_controller_service(state) as svc:
        await svc.container_add("c1", str(tmp_path / "c1.img"), 1 << 30)
        await svc.disk_create("thin", 64 << 20, False, None, None)
        done: dict[str, Any] = {}

        async def thick() -> None:
            done["thick"] = await svc.disk_create("big", 256 << 20, True, None, None)

        async with trio.open_nursery() as n, open_controller(addr, role="agent") as ag:
            n.start_soon(thick)
            await trio.sleep(0.2)  # the thick create is zeroing now
            await ag.call("agent.register", name="a", host="h", mount="/m")
            await ag.call("disk.open", name="thin")
            with trio.move_on_after(10) as scope:
                r = await ag.call("disk.fault", name="thin", offset=0, length=4096,
                                  write=True)
            assert not scope.cancelled_caught, "a thin fault waited for a thick disk's zeroing"
            assert "thick" not in done
            slow_thick_zeroing.set()
        # both allocations are in the table, on separate space
        assert r["rows"][0][4] == 0
        assert svc.state.disks["big"].allocated == 256 << 20
        assert (await svc.check())["ok"]


async def test_concurrent_grows_both_succeed(tmp_path: Path) -> None:
    """Two writers growing one disk (or an append racing an ftruncate): the smaller grow
    arrives second and must succeed, leaving the larger size, as on a regular file."""
    state = str(tmp_path / "s")
    addr = f"unix:{state}/controller.sock"
    async with open_controller_service(state) as svc:
        await svc.container_add("c1", str(tmp_path / "c1.img"), 1 << 30)
        await svc.disk_create("x", 0, False, None, None)
        async with open_controller(addr, role="agent") as ag:
            await ag.call("agent.register", name="a", host="h", mount="/m")
            await ag.call("disk.open", name="x")
            big = await ag.call("disk.resize", name="x", size=3 * SEG, grow_only=True)
            small = await ag.call("disk.resize", name="x", size=8192, grow_only=True)
            assert big["size"] == small["size"] == 3 * SEG
            # the caller learns the real size, so it does not grow again and again
            assert small["update"]["size"] == 3 * SEG
            # an explicit resize (vdctl) still refuses to shrink without --allow-shrink
            with pytest.raises(RemoteError) as ei:
                await ag.call("disk.resize", name="x", size=8192)
            assert ei.value.code == E_INVALID


async def test_close_after_a_rename_is_counted_against_the_disk(tmp_path: Path) -> None:
    """An agent that closes a disk under the name it opened it by (the rename push not yet
    seen) must close that disk: opens are keyed by identity, not name."""
    state = str(tmp_path / "s")
    addr = f"unix:{state}/controller.sock"
    async with open_controller_service(state) as svc:
        await svc.container_add("c1", str(tmp_path / "c1.img"), 1 << 30)
        await svc.disk_create("x", SEG, False, None, None)
        await svc.disk_create("z", SEG, False, None, None)

        box: dict[str, Any] = {}

        async def ack(msg: dict[str, Any]) -> None:
            # acks the push but applies nothing: the agent's own idea of the name is stale
            box["nursery"].start_soon(lambda: box["ag"].call("agent.ack", pid=msg["pid"]))

        async with trio.open_nursery() as n, \
                open_controller(addr, role="agent", on_push=ack) as ag, \
                open_controller(addr) as adm:
            box["nursery"], box["ag"] = n, ag
            await ag.call("agent.register", name="a", host="h", mount="/m")
            t = await ag.call("disk.open", name="x")
            assert t["name"] == "x" and isinstance(t["handle"], int)
            await ag.call("disk.open", name="z")
            await adm.call("disk.rename", name="x", new="y")
            assert "y" in svc.state.disks
            hb = await ag.call("agent.heartbeat")
            assert set(hb["epochs"]) == {"y", "z"}
            with pytest.raises(RemoteError) as ei:
                await adm.call("disk.rm", name="y")
            assert ei.value.code == E_BUSY
            await ag.call("disk.close", name="x", handle=t["handle"])
            await adm.call("disk.rm", name="y")
            # z is still open: closing "x" did not touch it
            with pytest.raises(RemoteError):
                await adm.call("disk.rm", name="z")
