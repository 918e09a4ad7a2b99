"""The copier yields to writers (issue 15; docs/movement.md, "Where a first write's time
goes"), against an in-process controller with simulated agents: a controller-wide bound
on copier batches, copier threads on a limiter of their own, small copy steps, and a
commit that holds the disk's lock for neither an agent round trip nor a flush, yet keeps
L1 out of every plan until it is punched."""

from __future__ import annotations

import threading

import trio
from simagent import BS, SEG, agent_ctx, pattern

from controller import moves as M
from controller import protocol as P
from controller import storage
from controller.daemon import open_controller_service
from controller.protocol import RemoteError


async def _setup(tmp_path, svc, size=SEG, c1=64 << 20):
    await svc.container_add("c1", str(tmp_path / "c1.img"), c1)
    await svc.container_add("c2", str(tmp_path / "c2.img"), 64 << 20)
    await svc.disk_create("d", size, True, None, "c1")
    return svc.state.disks["d"], svc.state.containers["c2"].lun


async def _start(svc, d, vstart, dst):
    async with svc.ctx.dlock(d):
        unit = next(M.move_units(d, vstart, vstart + SEG, None))
        return await svc.movement.start_move(d, unit, dst)


def _held_copies(monkeypatch):
    """Make the copier's copies (background: at low priority) wait for the returned
    event, counting how many run at once (returned list: [now, most, then each copy's
    writeback argument])."""
    release = threading.Event()
    count = [0, 0]
    lock = threading.Lock()
    orig = storage.copy_ranges

    def held(copies, may_write=storage.unfenced, durable=True, writeback=False):
        with lock:
            count[0] += 1
            count[1] = max(count[1], count[0])
            count.append(writeback)
        try:
            release.wait(20)
            return orig(copies, may_write, durable, writeback)
        finally:
            with lock:
                count[0] -= 1

    orig_low = storage.low_priority

    def low(fn, *args):  # only the copier's copies are held, not a fault's
        return orig_low(held if fn is orig else fn, *args)
    monkeypatch.setattr(storage, "low_priority", low)
    return release, count


async def test_copier_batches_are_bounded_controller_wide_and_use_their_own_threads(
        tmp_path, monkeypatch):
    """Four moves run at once, but at most moves.COPY_CONCURRENT batches copy at a time,
    and their worker threads never take trio's default limiter (write faults' copies and
    the journal's commits use that one); each copy starts its write-back. Fails with the
    moves copying unbounded (4 at once), in default threads (the default limiter has
    tokens borrowed), or without the write-back."""
    release, count = _held_copies(monkeypatch)
    state = str(tmp_path / "s")
    async with open_controller_service(state, lease=3.0) as svc:
        d, c2 = await _setup(tmp_path, svc, 4 * SEG)
        # the four segments mapped (as a write fault does; no agent has d open)
        async with svc.ctx.dlock(d):
            await svc.faults.map_zeros(d, 0, 4 * SEG, None)
        vs = []
        for k in range(4):
            vs += await _start(svc, d, k * SEG, c2)
        assert len(vs) == 4
        async with trio.open_nursery() as n:
            for v in vs:
                n.start_soon(svc.movement.run_move, d, v)
            with trio.fail_after(10):
                while count[0] < M.COPY_CONCURRENT:
                    await trio.sleep(0.01)
            await trio.sleep(0.2)  # the others would have started by now
            in_default = trio.to_thread.current_default_thread_limiter().borrowed_tokens
            busy = count[0]
            release.set()
        assert not d.alts  # every move committed
    assert busy == M.COPY_CONCURRENT, f"{busy} copier batches copied at once"
    assert count[1] == M.COPY_CONCURRENT
    assert in_default == 0, f"{in_default} copier threads took trio's default limiter"
    assert count[2:] and all(count[2:]), "the copier's copies did not start write-back"


async def test_a_write_fault_waits_for_one_small_step_not_the_whole_segment(
        tmp_path, monkeypatch):
    """While the copier copies the first step of a 4 MiB segment (held), a write fault on a
    block of the same segment outside that step is answered at once, and the block is
    marked and written at L2; one inside the step waits for it. Fails with steps of a whole
    segment (moves.COPY_CHUNK_BLOCKS = 1024): both faults wait for the held copy."""
    assert M.COPY_CHUNK_BLOCKS * BS <= 1 << 20
    release, count = _held_copies(monkeypatch)
    state = str(tmp_path / "s")
    addr = f"unix:{state}/controller.sock"
    async with open_controller_service(state, lease=3.0) as svc:
        d, c2 = await _setup(tmp_path, svc)
        async with trio.open_nursery() as n:
            async with agent_ctx(addr, "A", n) as A:
                await A.open("d")
                await A.fault("d", 0, SEG, True)
                A.pwrite("d", 0, pattern(0x11, SEG))
                assert await _start(svc, d, 0, c2) == [0]
                n.start_soon(svc.movement.run_move, d, 0)
                with trio.fail_after(10):
                    while count[0] < 1:
                        await trio.sleep(0.01)
                far = 500 * BS  # outside the held step (blocks 0..255)
                with trio.fail_after(5):
                    await A.fault("d", far, BS, True)
                assert d.alts[0].bitmap.test(500) and not d.alts[0].bitmap.test(5)
                assert A.can_write("d", far, BS) and A.entry("d", far).lun == c2
                A.pwrite("d", far, pattern(0x55, BS))
                near = trio.Event()

                async def fault_near() -> None:
                    await A.fault("d", 5 * BS, BS, True)
                    near.set()
                n.start_soon(fault_near)
                await trio.sleep(0.3)
                waited = not near.is_set()
                release.set()
                with trio.fail_after(10):
                    await near.wait()
                    while d.alts:
                        await trio.sleep(0.01)
                got = A.pread("d", 0, SEG)
                n.cancel_scope.cancel()
    assert waited, "a fault on a block the copier was copying did not wait for the copy"
    want = bytearray(pattern(0x11, SEG))
    want[far:far + BS] = pattern(0x55, BS)
    assert got == bytes(want)


async def _slow_drains(n, B):
    """Make B hold its acknowledgement of drained pushes until the returned go is set;
    held is set when one arrives."""
    go, held = trio.Event(), trio.Event()
    plain = B.on_push

    async def slow(msg):
        if not msg.get("drain"):
            await plain(msg)
            return
        held.set()

        async def later() -> None:
            await go.wait()
            await plain(msg)
        n.start_soon(later)
    B.client.on_push = slow  # (its client calls it for every push)
    return go, held


async def _answered_meanwhile(A, held, offset) -> bool:
    """Whether A's write fault at offset is answered within 2 s once held is set."""
    with trio.fail_after(5):
        await held.wait()
    try:
        with trio.fail_after(2):
            await A.fault("d", offset, BS, True)
        return True
    except trio.TooSlowError:
        return False


async def test_commit_holds_the_disk_lock_for_no_agent_round_trip(tmp_path):
    """While a commit's drained push waits for a slow agent's acknowledgement, a write
    fault elsewhere on the same disk is answered. Fails with the push under the disk's
    lock (the fault waits for the acknowledgement)."""
    state = str(tmp_path / "s")
    addr = f"unix:{state}/controller.sock"
    async with open_controller_service(state, lease=3.0) as svc:
        d, c2 = await _setup(tmp_path, svc, 2 * SEG)
        async with trio.open_nursery() as n:
            async with agent_ctx(addr, "A", n) as A, agent_ctx(addr, "B", n) as B:
                await A.open("d")
                await B.open("d")
                await A.fault("d", 0, SEG, True)
                A.pwrite("d", 0, pattern(0x11, SEG))
                assert await _start(svc, d, 0, c2) == [0]
                while await svc.movement.copier.copy_step(d, 0):
                    pass
                go, held = await _slow_drains(n, B)
                n.start_soon(svc.movement.copier._commit_move, d, 0)
                answered = await _answered_meanwhile(A, held, SEG)  # the other segment
                go.set()
                with trio.fail_after(10):
                    while d.alts:
                        await trio.sleep(0.01)
                n.cancel_scope.cancel()
    assert answered, "a write fault waited for the commit's drained push"


async def test_publish_holds_the_disk_lock_for_no_agent_round_trip(tmp_path, monkeypatch):
    """While the copier's publish of a batch waits for a slow agent's acknowledgement of
    its drained push, a write fault elsewhere on the same disk is answered; the batch is
    published once the agent acknowledges. Fails with the push under the disk's lock."""
    monkeypatch.setattr(M, "COPY_BATCH_BLOCKS", 256)
    monkeypatch.setattr(M, "COPY_CHUNK_BLOCKS", 128)
    state = str(tmp_path / "s")
    addr = f"unix:{state}/controller.sock"
    async with open_controller_service(state, lease=3.0) as svc:
        d, c2 = await _setup(tmp_path, svc, 2 * SEG)
        async with trio.open_nursery() as n:
            async with agent_ctx(addr, "A", n) as A, agent_ctx(addr, "B", n) as B:
                await A.open("d")
                await B.open("d")
                await A.fault("d", 0, SEG, True)
                A.pwrite("d", 0, pattern(0x11, SEG))
                assert await _start(svc, d, 0, c2) == [0]
                go, held = await _slow_drains(n, B)
                n.start_soon(svc.movement.copier.copy_step, d, 0)  # one batch, published
                answered = await _answered_meanwhile(A, held, SEG)
                go.set()
                with trio.fail_after(10):
                    while svc.movement.copier.published_bytes < 256 * BS:
                        await trio.sleep(0.01)
                n.cancel_scope.cancel()
    assert answered, "a write fault waited for the publish's drained push"


async def test_commit_keeps_l1_out_of_every_plan_until_it_is_punched(tmp_path, monkeypatch):
    """The commit records move.commit (freeing L1) before it punches L1: until the punch
    is done, L1 stays reserved, so new space for another disk never lands there (a late
    punch would wipe its data). c1 holds one segment besides its header, so L1 is the only
    place there: the other disk's write finds no room while the punch is held. Fails
    without the reservation: that write is placed at L1 and punched away."""
    punching = threading.Event()
    go = threading.Event()
    orig = storage.release_ranges

    punched = threading.Event()

    def held(path, ranges, may_write=storage.unfenced):
        punching.set()
        go.wait(20)
        orig(path, ranges, may_write)
        punched.set()
    monkeypatch.setattr(storage, "release_ranges", held)
    state = str(tmp_path / "s")
    addr = f"unix:{state}/controller.sock"
    async with open_controller_service(state, lease=3.0) as svc:
        d, c2 = await _setup(tmp_path, svc, c1=(1 << 20) + SEG)
        await svc.disk_create("e", SEG, False, None, "c1")  # thin: placed at its fault
        async with trio.open_nursery() as n:
            async with agent_ctx(addr, "A", n) as A:
                await A.open("d")
                await A.open("e")
                await A.fault("d", 0, SEG, True)
                A.pwrite("d", 0, pattern(0x11, SEG))
                l1 = d.extents.find(0).offset
                assert await _start(svc, d, 0, c2) == [0]
                while await svc.movement.copier.copy_step(d, 0):
                    pass
                n.start_soon(svc.movement.copier._commit_move, d, 0)
                with trio.fail_after(5):
                    while not punching.is_set():
                        await trio.sleep(0.01)
                assert not d.alts  # committed: L1 is free in the table
                e_off = None
                try:
                    await A.fault("e", 0, SEG, True)
                    e_off = svc.state.disks["e"].extents.find(0).offset
                    A.pwrite("e", 0, pattern(0x77, SEG))
                except RemoteError as err:
                    assert err.code == P.E_NO_SPACE, err
                go.set()
                with trio.fail_after(5):
                    while not punched.is_set():
                        await trio.sleep(0.01)
                got = A.pread("e", 0, SEG) if e_off is not None else None
                n.cancel_scope.cancel()
    assert e_off is None or not (l1 <= e_off < l1 + SEG), f"disk e placed at {e_off}: L1"
    assert got in (None, pattern(0x77, SEG))


def test_a_small_durable_copy_is_one_dsync_write(tmp_path, monkeypatch):
    """A write fault's durable copy (at most 256 KiB) is read and written with RWF_DSYNC:
    no write-back of the range and no settling rewrite of its first block (the same block
    written twice). The bytes land; a fenced controller writes nothing; a short source
    read is EIO. Fails with the former path (sync_file_range, then a rewrite)."""
    import errno
    import os

    import pytest

    from controller.writegate import Fenced

    src, dst = tmp_path / "a.img", tmp_path / "b.img"
    src.write_bytes(pattern(0x5A, 64 * BS))
    dst.write_bytes(bytes(64 * BS))
    calls: list[int] = []
    real = os.pwritev

    def pwritev(fd, bufs, off, flags=0):
        calls.append(flags)
        return real(fd, bufs, off, flags)
    monkeypatch.setattr(os, "pwritev", pwritev)

    def no_sync_range(*a):
        raise AssertionError("sync_file_range on a small durable copy")
    monkeypatch.setattr(storage, "sync_file_range", no_sync_range)
    storage.copy_ranges([(str(src), 3 * BS, str(dst), 10 * BS, 2 * BS)])
    assert calls == [os.RWF_DSYNC]
    got = dst.read_bytes()
    assert got[10 * BS:12 * BS] == pattern(0x5A, 64 * BS)[3 * BS:5 * BS]
    assert got[:10 * BS] == bytes(10 * BS) and got[12 * BS:] == bytes(52 * BS)

    with pytest.raises(Fenced):
        storage.copy_ranges([(str(src), 0, str(dst), 0, BS)], lambda: False)
    assert dst.read_bytes()[:BS] == bytes(BS)
    with pytest.raises(OSError) as ei:
        storage.copy_ranges([(str(src), 63 * BS, str(dst), 0, 2 * BS)])
    assert ei.value.errno == errno.EIO


def test_the_copiers_copies_start_write_back_as_they_go(tmp_path, monkeypatch):
    """copy_ranges(durable=False, writeback=True) (the copier's steps) starts write-back of
    each chunk it wrote (sync_file_range WRITE, waiting for nothing), so the batch's one
    flush, and any fdatasync of the container meanwhile (a lazy mark's, an agent's
    fsync), finds little dirty; without writeback (a lazy write fault's copy) it starts
    none. Fails without the write-back."""
    src, dst = tmp_path / "a.img", tmp_path / "b.img"
    src.write_bytes(pattern(0x3C, 512 * BS))
    dst.write_bytes(bytes(512 * BS))
    seen: list[tuple[int, int, int]] = []
    real = storage.sync_file_range

    def record(fd, off, n, flags):
        seen.append((off, n, flags))
        real(fd, off, n, flags)
    monkeypatch.setattr(storage, "sync_file_range", record)
    storage.copy_ranges([(str(src), 0, str(dst), 0, 512 * BS)], durable=False,
                        writeback=True)
    assert seen and all(f == storage._SYNC_WRITE for _o, _n, f in seen)
    assert sum(n for _o, n, _f in seen) == 512 * BS
    assert dst.read_bytes() == src.read_bytes()
    seen.clear()
    storage.copy_ranges([(str(src), 0, str(dst), 0, 512 * BS)], durable=False)
    assert seen == []
