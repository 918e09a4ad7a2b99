"""Space around moves, against an in-process controller: the new space of a move is
reserved when planned, a shrink racing the copier."""

from __future__ import annotations

import time

import pytest
import trio
from simagent import BS, SEG, agent_ctx

from controller import storage
from controller.daemon import open_controller_service
from controller.protocol import LABEL_BYTES, ZERO, RemoteError
from controller.writegate import unfenced

MB = 1 << 20


def _leaves(e):
    if isinstance(e, BaseExceptionGroup):
        for x in e.exceptions:
            yield from _leaves(x)
    else:
        yield e


async def test_every_piece_of_a_moves_new_space_is_reserved(
        tmp_path, monkeypatch):
    state = str(tmp_path / "s")
    addr = f"unix:{state}/controller.sock"
    orig = storage.zero_ranges
    slow = {"on": False}

    def zero(path, ranges, preallocate=False, may_write=unfenced):
        if slow["on"]:
            time.sleep(0.5)
        orig(path, ranges, preallocate, may_write)
    monkeypatch.setattr(storage, "zero_ranges", zero)
    async with open_controller_service(state, lease=1.0) as svc:
        await svc.container_add("c1", str(tmp_path / "c1.img"), 64 * MB)
        await svc.container_add("c2", str(tmp_path / "c2.img"), 12 * MB + LABEL_BYTES)
        await svc.disk_create("f", 12 * MB, False, 2 * MB, "c2")
        await svc.disk_create("g", 2 * MB, False, 2 * MB, "c2")
        await svc.disk_create("d", SEG, True, None, "c1")
        async with trio.open_nursery() as n, agent_ctx(addr, "G", n) as G:
            for i in range(6):                      # f fills c2 in order
                await G.client.call("disk.fault", name="f", offset=i * 2 * MB,
                                    length=BS, write=True)
            await svc.disk_discard("f", 2 * MB, 2 * MB)   # holes at 2M and 6M
            await svc.disk_discard("f", 6 * MB, 2 * MB)
            L = LABEL_BYTES  # c2's data starts after its label
            assert list(svc.state.containers["c2"].space.ranges()) == [
                (L + 2 * MB, 2 * MB), (L + 6 * MB, 2 * MB)]
            slow["on"] = True
            await svc.disk_migrate("d", "c2")   # needs 4M: two pieces
            await trio.sleep(0.1)                      # the job zeroes piece 1
            await G.open("g")
            # every piece of the migration's new space was reserved when planned:
            # g's fault cannot be given piece 2 (which the move would zero later)
            with pytest.raises(RemoteError) as ei:
                await G.fault("g", 0, BS, True)
            assert ei.value.code == "no_space"
            slow["on"] = False
            with trio.fail_after(20):
                while (await svc.job_ls())[0]["state"] == "running":
                    await trio.sleep(0.05)
            jobs = await svc.job_ls()
            chk = await svc.check()
            n.cancel_scope.cancel()
    assert jobs[0]["state"] == "done", jobs
    assert chk["ok"], chk


async def test_shrink_while_a_copier_step_is_in_flight(tmp_path, monkeypatch):
    state = str(tmp_path / "s")
    orig = storage.copy_ranges

    def slow(copies, may_write=unfenced, durable=True, writeback=False):
        time.sleep(1.0)
        orig(copies, may_write, durable, writeback)
    monkeypatch.setattr(storage, "copy_ranges", slow)
    died = None
    try:
        async with open_controller_service(state, lease=1.0) as svc:
            await svc.container_add("c1", str(tmp_path / "c1.img"), 64 * MB)
            await svc.container_add("c2", str(tmp_path / "c2.img"), 64 * MB)
            await svc.disk_create("d", SEG, True, None, None)
            await svc.disk_migrate("d", "c2")
            await trio.sleep(0.3)                    # the copier copies blocks 0..255
            await svc.disk_resize("d", 100 * BS, True)
            await trio.sleep(3)
            jobs = await svc.job_ls()
    except BaseException as e:  # noqa: BLE001
        died = [repr(x) for x in _leaves(e)]
    assert died is None, f"controller died: {died}"
    assert jobs[0]["state"] == "done", jobs


async def test_allocate_with_least_takes_what_fits(tmp_path):
    """disk.allocate with least (allocation ahead) maps what fits, in whole segments
    from the offset on, even in pieces around holes; E_NO_SPACE only if not even least
    fits. Without least (fallocate) it is all or nothing."""
    state = str(tmp_path / "s")
    addr = f"unix:{state}/controller.sock"
    async with open_controller_service(state, lease=1.0) as svc:
        await svc.container_add("c1", str(tmp_path / "c1.img"), 20 * MB + LABEL_BYTES)
        await svc.container_add("big", str(tmp_path / "big.img"), 256 * MB + LABEL_BYTES)
        await svc.disk_create("f", 8 * MB, False, 2 * MB, "c1")
        await svc.disk_create("d", 64 * MB, False, 2 * MB, "c1")
        async with trio.open_nursery() as n, agent_ctx(addr, "G", n) as G:
            await G.open("f")
            for i in range(4):                       # f fills c1's first 8M
                await G.fault("f", i * 2 * MB, BS, True)
            await svc.disk_discard("f", 2 * MB, 2 * MB)   # a hole at 2M: 14M free
            await G.open("d")

            async def allocate(off, length, least=None):
                extra = {} if least is None else {"least": least}
                return await G.client.call("disk.allocate", name="d", offset=off,
                                           length=length, reserve=False, **extra)

            with pytest.raises(RemoteError) as ei:   # fallocate: all or nothing
                await allocate(0, 32 * MB)
            assert ei.value.code == "no_space"
            assert svc.state.disks["d"].allocated == 0
            with pytest.raises(RemoteError):         # least must be in 1..length
                await allocate(0, 4 * MB, 5 * MB)
            # ahead: 32M asked, 14M there (the hole and 12M at the end): 14M mapped
            r = await allocate(0, 32 * MB, BS)
            d = svc.state.disks["d"]
            assert d.allocated == 14 * MB
            assert svc.state.containers["c1"].space.free == 0
            assert svc.state.containers["big"].space.free == 256 * MB  # pinned
            mapped = [e for e in d.extents.entries(0, 64 * MB) if not e.flags & ZERO]
            assert (mapped[0].vstart, sum(e.length for e in mapped)) == (0, 14 * MB)
            assert r["rows"]  # the answer carries the new entries
            # nothing left: not even the segment the writer needs
            with pytest.raises(RemoteError) as ei:
                await allocate(14 * MB, 32 * MB, BS)
            assert ei.value.code == "no_space" and "need 2M" in ei.value.message
            # a segment given back: exactly that one is taken
            await svc.disk_discard("f", 0, 2 * MB)
            await allocate(14 * MB, 32 * MB, 3 * MB // 2)
            assert svc.state.disks["d"].allocated == 16 * MB
            chk = await svc.check()
            n.cancel_scope.cancel()
    assert chk["ok"], chk
