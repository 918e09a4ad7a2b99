"""After a controller crash mid-drain, the drain job and run_jobs' orphan runners both
claim the same moves: the job's loop spins on the event loop."""
from __future__ import annotations

import trio
from simagent import SEG

from controller.daemon import open_controller_service
from controller.service import jobs as J
from controller.service import movement

MB = 1 << 20


class Crash(Exception):
    pass


async def test_drain_job_busy_loops_after_restart(tmp_path, monkeypatch):
    hold = tmp_path / "hold"
    hold.write_text("")
    monkeypatch.setenv(movement.TEST_HOLD_COPIER_ENV, str(hold))
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
    orig_next = J.JobOps._next_units

    def counting(self, j):
        calls["n"] += 1
        return orig_next(self, j)
    monkeypatch.setattr(J.JobOps, "_next_units", counting)
    async with open_controller_service(state, lease=1.0) as svc:
        assert svc.state.jobs[1].state == "running"
        trio.current_time()
        await trio.sleep(2.0)
        n = calls["n"]
        svc.journal.commit  # noqa: B018
        await svc.job_abort(1)
    assert n < 100, f"the drain job looked at the table {n} times in 2 s (busy loop)"
