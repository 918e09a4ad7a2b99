"""rename over a disk that a migrate job is moving: the job follows the name."""
from __future__ import annotations

import os

import pytest
import trio
from simagent import SEG

from controller.daemon import open_controller_service
from controller.protocol import E_BUSY, RemoteError
from controller.service import movement

MB = 1 << 20


async def test_rename_over_a_disk_a_job_moves_is_refused(tmp_path, monkeypatch):
    """Review finding 9: a rename over a disk being migrated handed its job to the disk
    renamed over it. Now refused, clearly, and nothing changes."""
    hold = tmp_path / "hold"
    hold.write_text("")
    monkeypatch.setenv(movement.TEST_HOLD_COPIER_ENV, str(hold))
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
