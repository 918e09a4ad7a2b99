"""Space around moves, against an in-process controller: the new space of a move is
reserved when planned, a shrink racing the copier."""

from __future__ import annotations

import time

import pytest
import trio
from simagent import BS, SEG, agent_ctx

from controller import storage
from controller.daemon import open_controller_service
from controller.protocol import LABEL_BYTES, RemoteError

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

    def zero(path, ranges, preallocate=False):
        if slow["on"]:
            time.sleep(0.5)
        orig(path, ranges, preallocate)
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

    def slow(copies):
        time.sleep(1.0)
        orig(copies)
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
