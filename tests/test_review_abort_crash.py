"""_abort_move punches L2 before move.abort is durable: a crash in between leaves a
move whose marked blocks point at punched space (zeros)."""
from __future__ import annotations

import trio
from simagent import BS, SEG, agent_ctx, pattern, read_file

from controller.daemon import open_controller_service


class Crash(Exception):
    pass


def _has_crash(e: BaseException) -> bool:
    if isinstance(e, Crash):
        return True
    return isinstance(e, BaseExceptionGroup) and any(_has_crash(x) for x in e.exceptions)


async def test_crash_between_abort_punch_and_record_loses_marked_blocks(tmp_path):
    state = str(tmp_path / "s")
    addr = f"unix:{state}/controller.sock"
    try:
        async with open_controller_service(state, lease=1.0) as svc:
            await svc.container_add("c1", str(tmp_path / "c1.img"), 64 << 20)
            await svc.container_add("c2", str(tmp_path / "c2.img"), 64 << 20)
            await svc.disk_create("d", SEG, True, None, "c1")
            d = svc.state.disks["d"]
            c2 = svc.state.containers["c2"].lun
            async with trio.open_nursery() as n, agent_ctx(addr, "A", n) as A:
                await A.open("d")
                A.pwrite("d", 0, pattern(0x11, SEG))
                async with svc._dlock(d):
                    await svc._start_move(d, d.extents.find(0), c2)
                await A.fault("d", BS, BS, True)        # block 1 copied + marked
                A.pwrite("d", BS, pattern(0x22, BS))    # the host's write, at L2
                await A.client.call("disk.close", name="d")
                orig = svc.journal.commit

                async def commit(rec):
                    if rec.get("op") == "move.abort":
                        raise Crash("controller dies here (kill -9)")
                    return await orig(rec)
                svc.journal.commit = commit
                await svc._abort_move(d, 0)
    except BaseException as e:  # noqa: BLE001
        assert _has_crash(e), e
    # restart: the move is still there (move.abort never reached the journal)
    async with open_controller_service(state, lease=1.0) as svc:
        d = svc.state.disks["d"]
        with trio.fail_after(20):
            while d.alts:              # run_jobs finishes the orphan move
                await trio.sleep(0.1)
        e = d.extents.find(0)
        lun_path = svc.state.luns[e.lun].path
        got = read_file(lun_path, e.offset + BS, BS)
        other = read_file(lun_path, e.offset + 2 * BS, BS)
    assert other == pattern(0x11, BS)
    assert got == pattern(0x22, BS), f"block 1 after restart: {got[:4]!r} (host wrote 0x22)"
