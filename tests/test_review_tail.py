"""Shrink into a moving segment's marked last block, then grow: _zero_tail zeroes the
bytes past the old end at L1 only, but the block's data lives at L2."""
from __future__ import annotations

import trio
from simagent import BS, SEG, agent_ctx, pattern

from controller.daemon import open_controller_service


async def test_shrink_then_grow_of_a_moving_tail_shows_old_bytes(tmp_path):
    state = str(tmp_path / "s")
    addr = f"unix:{state}/controller.sock"
    async with open_controller_service(state, lease=1.0) as svc:
        await svc.container_add("c1", str(tmp_path / "c1.img"), 64 << 20)
        await svc.container_add("c2", str(tmp_path / "c2.img"), 64 << 20)
        await svc.disk_create("d", SEG, True, None, "c1")
        d = svc.state.disks["d"]
        async with trio.open_nursery() as n, agent_ctx(addr, "A", n) as A:
            await A.open("d")
            A.pwrite("d", 0, pattern(0x11, SEG))
            async with svc._dlock(d):
                await svc._start_move(d, d.extents.find(0), svc.state.containers["c2"].lun)
            last = SEG - BS
            await A.fault("d", last, BS, True)
            A.pwrite("d", last, pattern(0x22, BS))
            await A.client.call("disk.close", name="d")
            await svc.disk_resize("d", last + 100, True)     # truncate into the block
            await svc.disk_resize("d", SEG, False)           # and extend again
            await A.open("d")
            got = A.pread("d", last + 100, BS - 100)
            n.cancel_scope.cancel()
    assert got == bytes(BS - 100), (
        f"bytes past the old end read {got[:4]!r}... (data from before the truncate), "
        "not zeros")
