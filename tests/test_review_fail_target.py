"""container fail of a migration's target: the job goes on moving healthy data onto it."""
from __future__ import annotations

import os

import trio
from simagent import SEG

from controller.daemon import open_controller_service
from controller.service import movement


async def test_failing_the_target_does_not_stop_the_migration(tmp_path, monkeypatch):
    hold = tmp_path / "hold"
    hold.write_text("")
    monkeypatch.setenv(movement.TEST_HOLD_COPIER_ENV, str(hold))
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
