"""Error handling of jobs: a failed copy, a clean controller stop mid-job."""
from __future__ import annotations

import errno
import os

import trio
from simagent import SEG

from controller import storage
from controller.daemon import open_controller_service
from controller.service import movement


def _leaves(e: BaseException):
    if isinstance(e, BaseExceptionGroup):
        for x in e.exceptions:
            yield from _leaves(x)
    else:
        yield e


async def test_failed_copy_in_a_job_takes_down_the_controller(tmp_path, monkeypatch):
    state = str(tmp_path / "s")

    def broken(copies):
        raise OSError(errno.EIO, "Input/output error (injected)")
    monkeypatch.setattr(storage, "copy_ranges", broken)
    crashed = None
    try:
        async with open_controller_service(state, lease=1.0) as svc:
            await svc.container_add("c1", str(tmp_path / "c1.img"), 64 << 20)
            await svc.container_add("c2", str(tmp_path / "c2.img"), 64 << 20)
            await svc.disk_create("d", 2 * SEG, True, None, None)
            await svc.disk_migrate("d", "c2")
            await trio.sleep(3)   # the job should end "failed"; the controller serve on
            jobs = await svc.job_ls()
    except BaseException as e:  # noqa: BLE001
        crashed = e
    monkeypatch.undo()
    async with open_controller_service(state, lease=1.0) as svc:
        after = await svc.job_ls()
        left = svc._remaining(svc.state.jobs[1])
        await svc.job_abort(1) if svc.state.jobs[1].state == "running" else None
    assert crashed is None, (
        f"controller service died: {[repr(x) for x in _leaves(crashed)]}; "
        f"journaled job state after restart: {after[0]['state']!r} with {left} bytes left")
    assert jobs[0]["state"] == "failed", jobs


async def test_clean_stop_mid_job(tmp_path, monkeypatch):
    state = str(tmp_path / "s")
    hold = tmp_path / "hold"
    hold.write_text("")
    monkeypatch.setenv(movement.TEST_HOLD_COPIER_ENV, str(hold))
    outcome = "stopped cleanly"
    try:
        with trio.fail_after(15):
            async with open_controller_service(state, lease=1.0) as svc:
                await svc.container_add("c1", str(tmp_path / "c1.img"), 64 << 20)
                await svc.container_add("c2", str(tmp_path / "c2.img"), 64 << 20)
                await svc.disk_create("d", 2 * SEG, True, None, None)
                await svc.disk_migrate("d", "c2")
                await trio.sleep(2.0)
    except trio.TooSlowError:
        outcome = "HUNG on shutdown (>15 s)"
    except BaseException as e:  # noqa: BLE001
        outcome = f"raised {[repr(x) for x in _leaves(e)]}"
    os.unlink(hold)
    async with open_controller_service(state, lease=1.0) as svc:
        j = svc.state.jobs[1]
        st, left = j.state, svc._remaining(j)
        with trio.move_on_after(20):
            while svc.state.jobs[1].state == "running":
                await trio.sleep(0.1)
    assert outcome == "stopped cleanly" and st == "running", (
        f"stop: {outcome}; after restart the job is {st!r} with {left} bytes left to move")
