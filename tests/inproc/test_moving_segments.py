"""A segment being moved, against an in-process controller with simulated agents (the real
virtfs.mapcache.DiskTable, I/O on the container files): which side each agent reads and
writes, shrink and grow of a moving tail, a crash in the middle of an abort."""

from __future__ import annotations

import trio
from simagent import BS, SEG, agent_ctx, pattern, read_file

from controller.daemon import open_controller_service


async def _setup(tmp_path, svc):
    await svc.container_add("c1", str(tmp_path / "c1.img"), 64 << 20)
    await svc.container_add("c2", str(tmp_path / "c2.img"), 64 << 20)
    await svc.disk_create("d", SEG, True, None, "c1")
    return svc.state.disks["d"], svc.state.containers["c2"].lun


async def _start(svc, d, dst):
    async with svc.ctx.dlock(d):
        return await svc.movement.start_move(d, d.extents.find(0), dst)


async def test_copier_marked_blocks_are_written_only_after_other_agents_remap_them(tmp_path):
    state = str(tmp_path / "s")
    addr = f"unix:{state}/controller.sock"
    async with open_controller_service(state, lease=3.0) as svc:
        d, c2 = await _setup(tmp_path, svc)
        async with trio.open_nursery() as n:
            async with agent_ctx(addr, "A", n) as A, agent_ctx(addr, "B", n) as B:
                await A.open("d")
                await B.open("d")
                A.pwrite("d", 0, pattern(0x11, SEG))          # old data, at L1
                assert await _start(svc, d, c2) == [0]         # pushed nowrite L1, acked
                assert await svc.movement.copier.copy_step(d, 0)  # copier: blocks 0..255 marked
                # A writes block 300: a fault; its answer covers the whole segment window
                await A.fault("d", 300 * BS, BS, True)
                A.pwrite("d", 300 * BS, pattern(0x33, BS))
                # block 5 was marked by the copier, but no other agent was told: A may
                # not write it without a fault (which remaps it at B first)
                assert not A.can_write("d", 5 * BS, BS), A.entry("d", 5 * BS)
                await A.fault("d", 5 * BS, BS, True)
                A.pwrite("d", 5 * BS, pattern(0x22, BS))
                # B was never told: it still reads block 5 at L1 (nowrite entries read direct)
                eb = B.entry("d", 5 * BS)
                got = B.pread("d", 5 * BS, BS)
                n.cancel_scope.cancel()
        assert got == pattern(0x22, BS), (
            f"B read block 5 from {eb} (L1) and got old data {got[:1]!r}; A wrote 0x22 at L2")


async def test_sub_block_write_pushes_a_byte_range_but_answers_a_whole_block(tmp_path):
    state = str(tmp_path / "s")
    addr = f"unix:{state}/controller.sock"
    async with open_controller_service(state, lease=3.0) as svc:
        d, c2 = await _setup(tmp_path, svc)
        async with trio.open_nursery() as n:
            async with agent_ctx(addr, "A", n) as A, agent_ctx(addr, "B", n) as B:
                await A.open("d")
                await B.open("d")
                A.pwrite("d", 0, pattern(0x11, SEG))
                await _start(svc, d, c2)
                # a 512-byte write at 4096 (FUSE passes the user's byte range through)
                await A.fault("d", BS, 512, True)
                A.pwrite("d", BS, pattern(0x22, 512))
                # A's answer made the whole block 1 writable at L2: the next sub-block
                # write in block 1 needs no fault
                assert A.can_write("d", BS + 2048, 512), A.entry("d", BS + 2048)
                A.pwrite("d", BS + 2048, pattern(0x44, 512))
                eb = B.entry("d", BS + 2048)
                got = B.pread("d", BS + 2048, 512)
                n.cancel_scope.cancel()
        assert got == pattern(0x44, 512), (
            f"B reads [6144, 6656) from {eb} and gets {got[:1]!r}; A wrote 0x44 at L2")


async def test_shrink_then_grow_of_a_moving_tail_reads_zeros(tmp_path):
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
            async with svc.ctx.dlock(d):
                await svc.movement.start_move(d, d.extents.find(0), svc.state.containers["c2"].lun)
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


class Crash(Exception):
    pass


def _has_crash(e: BaseException) -> bool:
    if isinstance(e, Crash):
        return True
    return isinstance(e, BaseExceptionGroup) and any(_has_crash(x) for x in e.exceptions)


async def test_crash_between_abort_punch_and_record_keeps_marked_blocks(tmp_path):
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
                async with svc.ctx.dlock(d):
                    await svc.movement.start_move(d, d.extents.find(0), c2)
                await A.fault("d", BS, BS, True)        # block 1 copied + marked
                A.pwrite("d", BS, pattern(0x22, BS))    # the host's write, at L2
                await A.client.call("disk.close", name="d")
                orig = svc.journal.commit

                async def commit(rec):
                    if rec.get("op") == "move.abort":
                        raise Crash("controller dies here (kill -9)")
                    return await orig(rec)
                svc.journal.commit = commit
                await svc.movement.abort_move(d, 0)
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


async def test_copier_publishes_its_marked_blocks_writable_at_l2_to_every_agent(
        tmp_path, monkeypatch):
    """The copier's marks reach agents as it goes: after a batch (here 256 blocks of a
    1024-block segment) both agents may write its blocks at L2 with no fault, and read
    each other's writes there; an agent that opens the disk later gets them writable
    too; blocks not copied yet stay nowrite at L1. Fails without the push (the agents'
    entries stay nowrite L1) and without the published set (the later open gets nowrite)."""
    import controller.moves as M

    monkeypatch.setattr(M, "COPY_BATCH_BLOCKS", 256)
    monkeypatch.setattr(M, "COPY_CHUNK_BLOCKS", 128)
    state = str(tmp_path / "s")
    addr = f"unix:{state}/controller.sock"
    async with open_controller_service(state, lease=3.0) as svc:
        d, c2 = await _setup(tmp_path, svc)
        async with trio.open_nursery() as n:
            async with (agent_ctx(addr, "A", n, renew=True) as A,
                        agent_ctx(addr, "B", n, renew=True) as B):
                await A.open("d")
                await B.open("d")
                A.pwrite("d", 0, pattern(0x11, SEG))
                assert await _start(svc, d, c2) == [0]
                assert await svc.movement.copier.copy_step(d, 0)  # blocks 0..255, one batch
                assert d.alts[0].bitmap.count() == 256
                for ag in (A, B):
                    assert ag.can_write("d", 0, 256 * BS), ag.entry("d", 5 * BS)
                    assert ag.entry("d", 5 * BS).lun == c2
                    assert not ag.can_write("d", 256 * BS, BS), ag.entry("d", 256 * BS)
                A.pwrite("d", 5 * BS, pattern(0x22, BS))
                assert B.pread("d", 5 * BS, BS) == pattern(0x22, BS)
                async with agent_ctx(addr, "C", n, renew=True) as C:
                    await C.open("d")
                    assert C.can_write("d", 0, 256 * BS), C.entry("d", 5 * BS)
                    assert C.pread("d", 5 * BS, BS) == pattern(0x22, BS)
                assert svc.movement.copier.published_bytes == 256 * BS
                while await svc.movement.copier.copy_step(d, 0):
                    pass
                await svc.movement.copier._commit_move(d, 0)
                assert not d.alts
                got = B.pread("d", 0, SEG)
                n.cancel_scope.cancel()
        want = bytearray(pattern(0x11, SEG))
        want[5 * BS : 6 * BS] = pattern(0x22, BS)
        assert got == bytes(want)
