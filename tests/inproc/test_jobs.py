"""Background jobs (migrate, drain) against an in-process controller: a failed copy, a
clean stop and a crash mid-job, failing the target, a rename over the disk a job moves."""

from __future__ import annotations

import errno
import os

import pytest
import trio
from rig import hold_copier
from simagent import SEG

from controller import storage
from controller.daemon import open_controller_service
from controller.protocol import E_BUSY, RemoteError
from controller.service import jobs as J
from controller.writegate import unfenced

MB = 1 << 20


def _leaves(e: BaseException):
    if isinstance(e, BaseExceptionGroup):
        for x in e.exceptions:
            yield from _leaves(x)
    else:
        yield e


async def test_failed_copy_fails_the_job_not_the_controller(tmp_path, monkeypatch):
    state = str(tmp_path / "s")

    def broken(copies, may_write=unfenced, durable=True, writeback=False):
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
        left = svc.jobs.remaining(svc.state.jobs[1])
        await svc.job_abort(1) if svc.state.jobs[1].state == "running" else None
    assert crashed is None, (
        f"controller service died: {[repr(x) for x in _leaves(crashed)]}; "
        f"journaled job state after restart: {after[0]['state']!r} with {left} bytes left")
    assert jobs[0]["state"] == "failed", jobs


async def test_clean_stop_mid_job_leaves_it_to_resume(tmp_path, monkeypatch, arm_faults):
    state = str(tmp_path / "s")
    hold = tmp_path / "hold"
    hold.write_text("")
    arm_faults(hold_copier(hold))
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
        st, left = j.state, svc.jobs.remaining(j)
        with trio.move_on_after(20):
            while svc.state.jobs[1].state == "running":
                await trio.sleep(0.1)
    assert outcome == "stopped cleanly" and st == "running", (
        f"stop: {outcome}; after restart the job is {st!r} with {left} bytes left to move")


class Crash(Exception):
    pass


async def test_drain_resumed_after_a_crash_does_not_busy_loop(tmp_path, monkeypatch, arm_faults):
    hold = tmp_path / "hold"
    hold.write_text("")
    arm_faults(hold_copier(hold))
    state = str(tmp_path / "s")
    try:
        async with open_controller_service(state, lease=1.0) as svc:
            for c in ("c1", "c2"):
                await svc.container_add(c, str(tmp_path / f"{c}.img"), 64 * MB)
            await svc.disk_create("d", 4 * SEG, True, None, "c1")
            await svc.container_drain("c1", "c2")
            await trio.sleep(0.5)                 # 4 moves started, copier held
            assert len(svc.state.disks["d"].alts) == 4
            orig = svc.journal.commit

            async def commit(rec):
                if rec.get("op") == "job.end":
                    raise Crash()
                return await orig(rec)
            svc.journal.commit = commit
            raise Crash()                         # kill -9
    except BaseException:  # noqa: BLE001
        pass
    calls = {"n": 0}
    orig_next = J.Jobs._next_units

    def counting(self, j):
        calls["n"] += 1
        return orig_next(self, j)
    monkeypatch.setattr(J.Jobs, "_next_units", counting)
    async with open_controller_service(state, lease=1.0) as svc:
        assert svc.state.jobs[1].state == "running"
        trio.current_time()
        await trio.sleep(2.0)
        n = calls["n"]
        svc.journal.commit  # noqa: B018
        await svc.job_abort(1)
    assert n < 100, f"the drain job looked at the table {n} times in 2 s (busy loop)"


async def test_failing_the_target_stops_moving_data_onto_it(tmp_path, monkeypatch, arm_faults):
    hold = tmp_path / "hold"
    hold.write_text("")
    arm_faults(hold_copier(hold))
    async with open_controller_service(str(tmp_path / "s"), lease=1.0) as svc:
        await svc.container_add("c1", str(tmp_path / "c1.img"), 256 << 20)
        await svc.container_add("c2", str(tmp_path / "c2.img"), 256 << 20)
        await svc.disk_create("d", 8 * SEG, True, None, None)
        await svc.disk_migrate("d", "c2")
        await trio.sleep(0.3)
        await svc.container_fail("c2")
        os.unlink(hold)
        with trio.move_on_after(20):
            while svc.state.jobs[1].state == "running":
                await trio.sleep(0.1)
        j = svc.state.jobs[1]
        on = {svc.state.luns[e.lun].name for e in svc.state.disks["d"].extents}
        rows = (await svc.disk_map("d", 0, None))["rows"]
        err = sum(r[1] for r in rows if r[4] & 8)
    assert on != {"c2"}, (f"job {j.state!r}: all of d ({err} bytes, every entry `error`) "
                          f"was moved onto the failed container c2")


async def test_rename_over_a_disk_a_job_moves_is_refused(tmp_path, monkeypatch, arm_faults):
    """Review finding 9: a rename over a disk being migrated handed its job to the disk
    renamed over it. Now refused, clearly, and nothing changes."""
    hold = tmp_path / "hold"
    hold.write_text("")
    arm_faults(hold_copier(hold))
    async with open_controller_service(str(tmp_path / "s"), lease=1.0) as svc:
        for c in ("c1", "c2", "c3"):
            await svc.container_add(c, str(tmp_path / f"{c}.img"), 64 * MB)
        await svc.disk_create("S", SEG, True, None, "c1")
        await svc.disk_create("T", SEG, True, None, "c1")
        await svc.disk_migrate("T", "c2")
        await trio.sleep(0.3)
        with pytest.raises(RemoteError) as ei:
            await svc.disk_rename("S", "T", True)
        assert ei.value.code == E_BUSY and "is moving disk 'T'" in ei.value.message
        assert set(svc.state.disks) == {"S", "T"}
        os.unlink(hold)
        with trio.fail_after(20):
            while any(j.state == "running" for j in svc.state.jobs.values()):
                await trio.sleep(0.05)
        assert [e.lun for e in svc.state.disks["T"].extents] == [2]
        assert (await svc.check())["ok"]
