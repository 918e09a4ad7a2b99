"""Checkpoints of any size (issue 6): multi-frame files, copy-on-write snapshots,
commits during a checkpoint, crash windows, damage, and the boot counter."""

from __future__ import annotations

import copy
import io
import random
import shutil
import time
from array import array
from pathlib import Path
from typing import Any

import pytest
import trio
from stateimage import format1, image

from controller import checkpoint as checkpoint_mod
from controller import frames
from controller.checkpoint import (
    CHECKPOINT,
    Snapshot,
    from_format1,
    from_parts,
    load_checkpoint,
    write_checkpoint,
)
from controller.consistency import check
from controller.daemon import open_controller_service
from controller.extents import NOWRITE, ExtentMap
from controller.frames import JournalCorrupt
from controller.journal import Journal
from controller.records import ContainerAdd, ControllerBoot, DiskCreate, DiskMap, DiskUnmap, Record
from controller.recovery import JOURNAL, JOURNAL_NEXT, recover
from controller.state import State

B = 4096
SEG = 4 << 20
TiB = 1 << 40


def thin_records(ndisks: int, nseg: int, seg: int, *, seed: int = 1,
                 csize: int | None = None) -> list[Record]:
    """Records (no seq) for thin disks allocated a segment at a time in random order,
    placed next-fit as the service does: their extents do not merge."""
    csize = csize or ndisks * nseg * seg + (1 << 20)
    recs: list[Record] = [ContainerAdd("c0", 1, "/dev/null/c0", csize, True)]
    recs += [DiskCreate(f"t{i}", nseg * seg, seg, False, None, 1, 1.0, [])
             for i in range(ndisks)]
    order = [(d, s) for d in range(ndisks) for s in range(nseg)]
    random.Random(seed).shuffle(order)
    off = 0
    for d, s in order:  # next fit from an empty container: consecutive offsets
        recs.append(DiskMap(f"t{d}", [(s * seg, seg, 1, off)]))
        off += seg
    return recs


def applied(recs: list[Record]) -> State:
    s = State()
    for k, r in enumerate(recs, 1):
        s.apply(r, k)
    return s


def synthetic_state(n: int, seg: int = 64 * B) -> State:
    """One disk of n unmergeable extents (a permutation of the container), built
    directly (no per-record apply), plus a small thin disk and some free space."""
    p = 1_000_003  # a prime that does not divide n: i -> i * p mod n is a permutation
    assert n % p
    vs = array("q", range(0, n * seg, seg))
    ln = array("q", [seg]) * n
    lu = array("q", [1]) * n
    of = array("q", [(i * p % n) * seg for i in range(n)])
    fl = array("B", [0]) * n
    csize = n * seg + (256 << 20)
    free = [array("q", [n * seg]).tobytes(), array("q", [256 << 20]).tobytes()]
    w = {"format": 1, "seq": 10, "next_lun": 2, "boot": 3,
         "containers": [{"name": "c0", "lun": 1, "path": "/dev/null/c0", "size": csize,
                         "created": True, "failed": False, "free": free, "cursor": n * seg}],
         "disks": [
             {"name": "big", "size": n * seg, "segment_size": seg, "thick": False, "pin": None,
              "home": 1, "ctime": 1.0, "epoch": 5,
              "extents": [vs.tobytes(), ln.tobytes(), lu.tobytes(), of.tobytes(), fl.tobytes()],
              "alts": []},
             {"name": "small", "size": 64 << 20, "segment_size": seg, "thick": False,
              "pin": None, "home": 1, "ctime": 1.0, "epoch": 1,
              "extents": [b""] * 5, "alts": []}]}
    return from_format1(w)


# ---------------------------------------------------------------- copy-on-write extent maps


def test_snapshot_is_frozen_while_the_map_changes():
    rnd = random.Random(3)
    m = ExtentMap()
    slots = list(range(6000))
    rnd.shuffle(slots)
    for k, s in enumerate(slots[:5000]):
        m.insert(s * 8 * B, 8 * B, 1, k * 8 * B)
    before = m.to_wire()
    model = ExtentMap.from_wire(before)  # the same changes, never snapshotted
    snap = m.snapshot()
    for k in range(3000):
        s = rnd.randrange(6000)
        for mm in (m, model):
            if mm.find(s * 8 * B) is None:
                mm.insert(s * 8 * B, 8 * B, 2, (10000 + k) * 8 * B)
            elif k % 3:
                mm.remove_range(s * 8 * B + B, s * 8 * B + 3 * B)
            else:
                mm.set_flags(s * 8 * B, s * 8 * B + 8 * B, NOWRITE)
    # the snapshot reads as the map was, in parts of any size
    for size in (1, 777, 10**9):
        parts = list(snap.parts(size))
        assert [b"".join(p[i] for p in parts) for i in range(5)] == before, size
    assert list(m) == list(model) and len(m) == len(model)
    assert m.mapped_bytes == model.mapped_bytes
    snap.release()
    snap.release()  # idempotent
    # released: changes no longer copy chunks
    ids = [id(c) for c in m._chunks]
    m.remove_range(0, 8 * B)
    assert sum(a != b for a, b in zip(ids, (id(c) for c in m._chunks), strict=False)) <= 1


def test_extend_wire_checks_order_across_parts():
    m = ExtentMap.from_wire([array("q", v).tobytes() for v in ([0, 8192], [4096, 4096],
                                                               [1, 1], [0, 4096], [0, 0])]
                            [:4] + [array("B", [0, 0]).tobytes()])
    assert len(m) == 2
    late = [array("q", [8192]).tobytes(), array("q", [4096]).tobytes(),
            array("q", [1]).tobytes(), array("q", [0]).tobytes(), array("B", [0]).tobytes()]
    with pytest.raises(ValueError, match="overlaps"):
        m.extend_wire(late)  # starts inside the last extent
    assert len(m) == 2, "a refused part must append nothing"
    late[0] = array("q", [12288]).tobytes()
    m.extend_wire(late)
    assert [e.vstart for e in m] == [0, 8192, 12288]


# ---------------------------------------------------------------- state snapshots


def test_state_parts_roundtrip_with_free_lists_alts_and_boot():
    from controller.bitmap import Bitmap
    from controller.tables import Alt

    s = applied(thin_records(3, 50, 4 * B))
    s.apply(DiskUnmap("t1", 0, 40 * 4 * B))  # fragments
    s.apply(ControllerBoot(1))
    e = next(iter(s.disks["t0"].extents))
    bm = Bitmap(4)
    bm.set_range(1, 2)
    s.disks["t0"].alts[e.vstart] = Alt(1, 0, bm)  # (check() would object; parts do not)
    assert len(s.luns[1].space) > 10
    want = image(s)
    for size in (1, 100, 4 << 20):
        snap = Snapshot(s)
        parts = list(snap.parts(size))
        snap.release()
        assert image(from_parts(copy.deepcopy(parts))) == want, size
    assert from_parts(parts).boot == 1


# ---------------------------------------------------------------- (A) past the frame cap


async def test_checkpoint_past_the_frame_cap_through_the_committer(tmp_path, monkeypatch):
    """Issue 6 (A), small: with the frame cap at 64 KiB, a state of ~200 KiB used to
    kill the committer (CodecError in _checkpoint); now it is checkpointed in parts."""
    monkeypatch.setattr(frames, "MAX_JOURNAL_RECORD", 64 << 10)
    d = tmp_path / "state"
    d.mkdir()
    state = State()
    j = Journal(str(d), state, checkpoint_bytes=150_000)
    recs = thin_records(3, 2000, 4 * B)
    async with trio.open_nursery() as nursery:
        await nursery.start(j.run)
        for k, r in enumerate(recs):
            j.record(r)
            if k % 500 == 0:
                await j.wait_durable(state.seq)
        await j.wait_durable(state.seq)
        if j._checkpointing:  # the last one may still be running
            assert j._checkpoint_done is not None
            await j._checkpoint_done.wait()
        nursery.cancel_scope.cancel()
    j.close()
    assert j.checkpoints >= 1
    size = (d / CHECKPOINT).stat().st_size
    assert size > 64 << 10, "the checkpoint should be bigger than one frame may be"
    assert len(list(frames.FrameReader(io.BytesIO((d / CHECKPOINT).read_bytes())))) > 3
    live = image(state)
    assert live == image(applied(recs))
    r = recover(str(d))
    assert image(r.state) == live
    assert r.records < len(recs)
    assert check(r.state) == []


@pytest.mark.slow
async def test_nine_thin_tib_disks_checkpoint_and_reload(tmp_path):
    """Issue 6 (A), real size: 9 thin 1 TiB disks at 4 MiB in random order, about 78 MB
    of checkpoint, used to raise CodecError in journal_frame(state.to_wire())."""
    seg = 4 << 20
    state = applied(thin_records(9, TiB // seg, seg, seed=9))
    assert sum(len(x.extents) for x in state.disks.values()) > 2_300_000
    d = tmp_path / "state"
    d.mkdir()
    j = Journal(str(d), state)
    async with trio.open_nursery() as nursery:
        await nursery.start(j.run)
        await j._checkpoint()
        nursery.cancel_scope.cancel()
    j.close()
    assert (d / CHECKPOINT).stat().st_size > 64 << 20
    assert image(load_checkpoint(str(d))) == image(state)


async def test_loop_keeps_serving_and_commits_go_on_during_a_big_checkpoint(tmp_path):
    """A checkpoint of 2.5 million extents (about 80 MB, past the 64 MiB frame cap): a
    ticker task never waits more than 100 ms, records committed meanwhile (changing
    shared chunks) are durable at once and replay on top of the checkpoint."""
    seg = 64 * B
    state = synthetic_state(2_500_000, seg)
    d = tmp_path / "state"
    d.mkdir()
    j = Journal(str(d), state)
    gaps: list[float] = []
    during = 0
    in_checkpoint = False
    rnd = random.Random(5)
    async with trio.open_nursery() as nursery:
        await nursery.start(j.run)
        done = trio.Event()

        async def ticker() -> None:
            last = time.perf_counter()
            while not done.is_set():
                await trio.sleep(0.002)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        stopped = trio.Event()

        async def mutator() -> None:
            nonlocal during
            k = 0
            while not done.is_set():
                i = rnd.randrange(2_500_000)
                e = state.disks["big"].extents.find(i * seg)
                if e is not None:  # give a segment back and map it again elsewhere
                    await j.commit(DiskUnmap("big", i * seg, (i + 1) * seg))
                    off = state.luns[1].space.find_contiguous(seg)
                    await j.commit(DiskMap("big", [(i * seg, seg, 1, off)]))
                vstart = k % 1024 * seg
                if state.disks["small"].extents.find(vstart) is None:
                    off = state.luns[1].space.find_contiguous(seg)
                    await j.commit(DiskMap("small", [(vstart, seg, 1, off)]))
                k += 1
                if in_checkpoint:
                    during += 1
            stopped.set()

        nursery.start_soon(ticker)
        nursery.start_soon(mutator)
        await trio.sleep(0.05)
        t0 = time.perf_counter()
        in_checkpoint = True
        await j._checkpoint()
        in_checkpoint = False
        took = time.perf_counter() - t0
        done.set()
        await stopped.wait()
        await j.wait_durable(state.seq)
        nursery.cancel_scope.cancel()
    j.close()
    print(f"checkpoint {took:.2f} s, max gap {max(gaps) * 1e3:.1f} ms, {during} rounds")
    assert j.checkpoints == 1 and not (d / JOURNAL_NEXT).exists()
    assert during >= 10, f"only {during} rounds of commits during a {took:.2f} s checkpoint"
    assert max(gaps) < 0.100, f"the loop stalled for {max(gaps) * 1e3:.0f} ms"
    live = image(state)
    r = recover(str(d))
    assert r.records > 0, "the records committed during the checkpoint are in the journal"
    assert image(r.state) == live


# ---------------------------------------------------------------- crash windows


def _image(src: Path, dst: Path) -> None:
    dst.mkdir()
    for name in (CHECKPOINT, JOURNAL, JOURNAL_NEXT):
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)


async def test_crash_images_during_a_checkpoint_recover_the_live_state(tmp_path):
    d = tmp_path / "state"
    d.mkdir()
    state = State()
    j = Journal(str(d), state)
    recs = thin_records(2, 300, 4 * B)
    images: list[tuple[Path, dict[str, Any]]] = []
    real_retire = j._retire_old_sync

    def retire() -> None:  # the checkpoint is durable, journal.next not yet renamed
        _image(d, tmp_path / "after-rename")
        real_retire()

    j._retire_old_sync = retire  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(j.run)
        for r in recs[:200]:
            await j.commit(r)
        write_checkpoint(str(d), state)  # an older checkpoint under it all
        for r in recs[200:300]:
            await j.commit(r)
        job = await j._start_checkpoint()
        for r in recs[300:400]:
            await j.commit(r)
        _image(d, tmp_path / "before-rename")  # old checkpoint, journal, journal.next
        images.append((tmp_path / "before-rename", image(state)))
        await j._finish_checkpoint(job)
        images.append((tmp_path / "after-rename", image(state)))
        for r in recs[400:]:
            await j.commit(r)
        nursery.cancel_scope.cancel()
    j.close()
    assert (tmp_path / "before-rename" / JOURNAL_NEXT).exists()
    assert (tmp_path / "after-rename" / JOURNAL_NEXT).exists()
    ctl = tmp_path / "ctl"
    shutil.copytree(tmp_path / "before-rename", ctl)
    assert image(recover(str(d)).state) == image(state)
    for img, want in images:
        assert image(recover(str(img), repair=False).state) == want, img
        assert (img / JOURNAL_NEXT).exists()
        r = recover(str(img))
        assert image(r.state) == want, img
        assert not (img / JOURNAL_NEXT).exists(), "journal.next was not folded"
        assert r.journal_bytes == (img / JOURNAL).stat().st_size
        assert image(recover(str(img)).state) == want
    # a real controller starts on such an image and goes on
    def but_boot(w: dict[str, Any]) -> dict[str, Any]:
        # (its start journals a boot record, which chooses an installation id the
        # first time: docs/labels.md)
        return {k: v for k, v in w.items() if k not in ("boot", "seq", "installation")}

    async with open_controller_service(str(ctl), listen=[f"unix:{tmp_path}/c.sock"]) as svc:
        # (a controller may journal its start: a "controller.boot" record)
        assert but_boot(image(svc.state)) == but_boot(images[0][1])
        boot = svc.state.boot + 1
        await svc.journal.commit(ControllerBoot(boot))
    assert not (ctl / JOURNAL_NEXT).exists()
    assert recover(str(ctl)).state.boot == boot


async def test_shutdown_during_a_checkpoint(tmp_path):
    """Cancelled mid-checkpoint (a clean stop): checkpoint_now_sync still leaves one
    journal, empty, and a checkpoint of the live state."""
    d = tmp_path / "state"
    d.mkdir()
    state = State()
    j = Journal(str(d), state)
    recs = thin_records(2, 100, 4 * B)
    async with trio.open_nursery() as nursery:
        await nursery.start(j.run)
        for r in recs[:120]:
            await j.commit(r)
        await j._start_checkpoint()  # and never finished
        for r in recs[120:]:
            await j.commit(r)
        nursery.cancel_scope.cancel()
    assert (d / JOURNAL_NEXT).exists()
    j.checkpoint_now_sync()
    j.close()
    assert not (d / JOURNAL_NEXT).exists() and (d / JOURNAL).stat().st_size == 0
    assert image(load_checkpoint(str(d))) == image(state)


def test_journal_refuses_a_leftover_next_file(tmp_path):
    (tmp_path / JOURNAL_NEXT).write_bytes(b"")
    with pytest.raises(JournalCorrupt, match="recover"):
        Journal(str(tmp_path), State())


# ---------------------------------------------------------------- damage


@pytest.fixture
def multi_frame_checkpoint(tmp_path, monkeypatch) -> tuple[Path, State, list[int]]:
    monkeypatch.setattr(checkpoint_mod, "CHECKPOINT_PART_BYTES", 2000)
    s = applied(thin_records(3, 100, 4 * B))
    s.apply(DiskUnmap("t2", 0, 50 * 4 * B))
    write_checkpoint(str(tmp_path), s)
    data = (tmp_path / CHECKPOINT).read_bytes()
    ends = []
    pos = 0
    while pos < len(data):
        pos = frames.parse(data, pos)[1]
        ends.append(pos)
    assert len(ends) > 10
    return tmp_path, s, ends


def test_multi_frame_checkpoint_loads(multi_frame_checkpoint):
    d, s, _ = multi_frame_checkpoint
    assert image(load_checkpoint(str(d))) == image(s)


def test_truncated_checkpoint_is_refused_at_every_frame_end(multi_frame_checkpoint):
    d, s, ends = multi_frame_checkpoint
    path = d / CHECKPOINT
    data = path.read_bytes()
    for cut in [0, *ends[:-1], ends[-1] - 1, ends[3] + 5]:
        path.write_bytes(data[:cut])
        with pytest.raises(JournalCorrupt) as ei:
            load_checkpoint(str(d))
        assert str(path) in str(ei.value), cut


def test_damaged_or_extended_checkpoint_is_refused(multi_frame_checkpoint):
    d, s, ends = multi_frame_checkpoint
    path = d / CHECKPOINT
    data = path.read_bytes()
    for i in range(0, len(data), max(1, len(data) // 300)):
        bad = bytearray(data)
        bad[i] ^= 0x04
        path.write_bytes(bytes(bad))
        with pytest.raises(JournalCorrupt, match=str(path)):
            load_checkpoint(str(d))
    extra = frames.encode({"part": "extents", "cols": [b""] * 5})
    path.write_bytes(data + extra)
    with pytest.raises(JournalCorrupt, match="after the end"):
        load_checkpoint(str(d))
    # a frame swapped out for another valid one: the counts catch it
    path.write_bytes(data[: ends[2]] + data[ends[3] : ends[4]] + data[ends[4]:])
    with pytest.raises(JournalCorrupt):
        load_checkpoint(str(d))


def test_format_1_checkpoint_still_loads(tmp_path):
    s = applied(thin_records(2, 20, 4 * B))
    w = format1(s)
    del w["boot"]  # written before the boot counter existed
    (tmp_path / CHECKPOINT).write_bytes(frames.encode(w))
    t = load_checkpoint(str(tmp_path))
    assert t.boot == 0 and image(t) == image(s)
    (tmp_path / CHECKPOINT).write_bytes(frames.encode(w) * 2)
    with pytest.raises(JournalCorrupt, match="after a format-1"):
        load_checkpoint(str(tmp_path))


# ---------------------------------------------------------------- older checkpoints

DATA = Path(__file__).parent / "data"
OLD = ["checkpoint-format1", "checkpoint-format2", "checkpoint-format2-small-parts"]


@pytest.mark.parametrize("name", OLD)
def test_checkpoints_of_an_older_virtfs_load_and_are_rewritten_byte_for_byte(
        tmp_path, monkeypatch, name):
    """Checkpoints written before checkpoint.py existed (data/README.md) load, hold the
    same state in every format, and today's writer writes that state's format-2
    checkpoint exactly as the older code did, in default and in small parts."""
    (tmp_path / "old").mkdir()
    shutil.copyfile(DATA / name, tmp_path / "old" / CHECKPOINT)
    s = load_checkpoint(str(tmp_path / "old"))
    assert (s.seq, s.boot, s.next_lun, s.next_job) == (27, 2, 6, 3)
    assert list(s.disks) == ["thick", "thin", "clone", "empty"]
    assert list(s.snaps) == ["thin@s1", "thin@s2"] and s.disks["clone"].origin == "thin@s1"
    assert s.containers["c2"].failed and s.containers["c3"].draining
    assert s.jobs[1].state == "done" and s.jobs[2].aborting
    assert (s.disks["thin"].mtime, s.disks["thin"].stime) == (1700000100.125, 1700000200.0)
    assert len(s.disks["clone"].alts) == 1 and len(s.disks["thin"].extents) > 5
    for other in OLD:
        (tmp_path / other).mkdir()
        shutil.copyfile(DATA / other, tmp_path / other / CHECKPOINT)
        assert image(load_checkpoint(str(tmp_path / other))) == image(s), other
    for ref, part in (("checkpoint-format2", 512 << 10), ("checkpoint-format2-small-parts", 100)):
        monkeypatch.setattr(checkpoint_mod, "CHECKPOINT_PART_BYTES", part)
        out = tmp_path / f"new-{part}"
        out.mkdir()
        write_checkpoint(str(out), s)
        assert (out / CHECKPOINT).read_bytes() == (DATA / ref).read_bytes(), ref


# ---------------------------------------------------------------- (C) boot counter


async def test_boot_counter_is_journaled_replayed_and_checkpointed(tmp_path):
    d = tmp_path / "state"
    d.mkdir()
    state = State()
    j = Journal(str(d), state)
    async with trio.open_nursery() as nursery:
        await nursery.start(j.run)
        await j.commit(ControllerBoot(1))
        await j.commit(ControllerBoot(2))
        assert recover(str(d), repair=False).state.boot == 2  # by replay
        await j._checkpoint()
        assert load_checkpoint(str(d)).boot == 2  # by the checkpoint
        await j.commit(ControllerBoot(3))
        nursery.cancel_scope.cancel()
    j.close()
    r = recover(str(d))
    assert r.state.boot == 3 and r.records == 1
    assert (d / JOURNAL).stat().st_size == r.journal_bytes


async def test_version_stamps_grow_across_restarts_whatever_the_clock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Agents drop answers stamped lower than one they hold: a restarted controller must
    stamp higher than its previous incarnation ever did, even with the clock set back."""
    state = str(tmp_path / "s")
    async with open_controller_service(state) as svc:
        await svc.container_add("c1", str(tmp_path / "c1.img"), 1 << 30)
        await svc.disk_create("x", SEG, False, None, None)
        for _ in range(1000):
            svc.coherence.bump()
        before = svc.coherence.version
    monkeypatch.setattr(time, "time_ns", lambda: 0)  # the clock stepped back to 1970
    monkeypatch.setattr(time, "time", lambda: 0.0)
    async with open_controller_service(state) as svc:
        assert svc.coherence.version > before
        assert svc.state.boot == 2
