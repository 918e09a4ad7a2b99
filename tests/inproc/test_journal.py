"""controller/journal.py: torn tails, damage in the middle, checkpoints, crash windows."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import trio
from rig import ControllerProc
from stateimage import format1, image

from controller import codec
from controller.checkpoint import CHECKPOINT
from controller.client import open_controller
from controller.consistency import check
from controller.daemon import open_controller_service
from controller.frames import JournalCorrupt, encode
from controller.journal import Journal
from controller.records import (
    ContainerAdd,
    DiskCreate,
    DiskMap,
    DiskResize,
    DiskRm,
    Piece,
    Record,
    decode,
)
from controller.recovery import JOURNAL, JOURNAL_NEXT, recover
from controller.state import State
from controller.tables import StateError, round_up

B = 4096


def make_records(tmp_path: Path, n_disks: int = 6) -> list[dict[str, Any]]:
    """A realistic record sequence (seq 1..n), as the journal holds them: containers,
    thick and thin disks, changes."""
    s = State()
    recs: list[dict[str, Any]] = []

    def add(rec: Record) -> None:
        s.apply(rec, len(recs) + 1)
        recs.append({**rec.to_wire(), "seq": len(recs) + 1})

    def place(length: int, vstart: int) -> list[Piece]:
        c = s.containers["c1"]
        off = c.space.find_contiguous(round_up(length))
        assert off is not None
        return [(vstart, length, c.lun, off)]

    img = tmp_path / "c1.img"
    img.write_bytes(b"")
    os.truncate(img, 64 << 20)
    add(ContainerAdd("c1", 1, str(img), 64 << 20, False))
    for i in range(n_disks):
        size = (i + 1) * 40000 + i
        thick = i % 2 == 0
        add(DiskCreate(f"d{i}", size, 4 << 20, thick, None, 1, 1000.0 + i,
                       place(size, 0) if thick else []))
    add(DiskMap("d1", place(8 * B, 0)))
    d0 = s.disks["d0"]
    add(DiskResize("d0", 200000, place(200000 - round_up(d0.size), round_up(d0.size))))
    add(DiskRm("d2"))
    add(DiskCreate("last", 12345, 4 << 20, True, None, 1, 2000.0, place(12345, 0)))
    return recs


def frames(recs: list[dict[str, Any]]) -> list[bytes]:
    return [encode(r) for r in recs]


def replayed(recs: list[dict[str, Any]]) -> dict[str, Any]:
    s = State()
    for r in recs:
        s.apply_wire(copy.deepcopy(r))
    return image(s)


@pytest.fixture
def journal_dir(tmp_path: Path) -> tuple[Path, list[dict[str, Any]], list[bytes]]:
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    recs = make_records(tmp_path)
    fr = frames(recs)
    (d / JOURNAL).write_bytes(b"".join(fr))
    return d, recs, fr


def test_clean_journal_replays_everything(journal_dir):
    d, recs, fr = journal_dir
    r = recover(str(d))
    assert r.records == len(recs) and r.truncated_at is None
    assert r.journal_bytes == sum(map(len, fr))
    assert image(r.state) == replayed(recs)
    assert check(r.state) == []


def test_torn_tail_at_every_offset_of_the_last_record(journal_dir):
    d, recs, fr = journal_dir
    data = b"".join(fr)
    start = len(data) - len(fr[-1])
    want_short, want_full = replayed(recs[:-1]), replayed(recs)
    path = d / JOURNAL
    for cut in range(start, len(data) + 1):
        path.write_bytes(data[:cut])
        r = recover(str(d))
        if cut == len(data):
            assert r.records == len(recs) and image(r.state) == want_full
            continue
        assert r.records == len(recs) - 1, cut
        assert image(r.state) == want_short, cut
        assert r.truncated_at == (start if cut > start else None), cut
        assert path.stat().st_size == start, f"torn tail not cut at {cut}"
        # repair=False reports the same but leaves the file alone
        path.write_bytes(data[:cut])
        r = recover(str(d), repair=False)
        assert r.records == len(recs) - 1 and path.stat().st_size == cut


def test_every_bit_flip_in_the_last_record_drops_only_it(journal_dir):
    d, recs, fr = journal_dir
    data = b"".join(fr)
    start = len(data) - len(fr[-1])
    want = replayed(recs[:-1])
    path = d / JOURNAL
    for i in range(start, len(data)):
        for bit in range(8):
            bad = bytearray(data)
            bad[i] ^= 1 << bit
            path.write_bytes(bytes(bad))
            r = recover(str(d))
            assert r.records == len(recs) - 1, (i, bit)
            assert r.truncated_at == start, (i, bit)
            assert image(r.state) == want, (i, bit)
            assert path.stat().st_size == start


def test_real_controller_recovers_a_torn_tail(journal_dir, tmp_path):
    d, recs, fr = journal_dir
    data = b"".join(fr)
    (d / JOURNAL).write_bytes(data[: len(data) - 7])  # the last record ("last") is torn
    c = ControllerProc(d, tmp_path / "ctl.log")
    c.start()
    try:
        names = [x["name"] for x in c.vdctl("disk", "ls", "--format", "json").json()]
        assert names == sorted(r["name"] for r in recs[1:-1]
                               if r["op"] == "disk.create" and r["name"] != "d2")
        chk = c.vdctl("check")
        assert chk.rc == 0, chk.out
        # it keeps working: a new record lands after the cut
        assert c.vdctl("disk", "create", "after", "--size", "1M", "--thick").rc == 0
    finally:
        c.kill()
    r = recover(str(d))
    assert "after" in r.state.disks and "last" not in r.state.disks
    assert check(r.state) == []


def test_damage_in_the_middle_refuses_to_start(journal_dir, tmp_path):
    d, recs, fr = journal_dir
    data = b"".join(fr)
    offset = len(fr[0]) + len(fr[1])  # the third record
    bad = bytearray(data)
    bad[offset + 20] ^= 0x10  # inside its payload: CRC mismatch, valid records after it
    (d / JOURNAL).write_bytes(bytes(bad))
    path = str(d / JOURNAL)
    with pytest.raises(JournalCorrupt) as ei:
        recover(str(d))
    msg = str(ei.value)
    assert path in msg and f"offset {offset}" in msg
    assert (d / JOURNAL).read_bytes() == bytes(bad), "a refused journal must not be changed"

    c = ControllerProc(d, tmp_path / "ctl.log")
    c.start(wait=False)
    assert c.proc is not None
    rc = c.proc.wait(30)
    c.proc = None
    c.log.close()
    assert rc == 1
    log = (tmp_path / "ctl.log").read_text()
    assert path in log and f"offset {offset}" in log and "Traceback" not in log
    assert (d / JOURNAL).read_bytes() == bytes(bad)


def test_missing_records_are_refused(journal_dir):
    d, recs, fr = journal_dir
    (d / JOURNAL).write_bytes(b"".join(fr[:3] + fr[4:]))  # seq 4 missing
    with pytest.raises(JournalCorrupt, match="expected seq 4"):
        recover(str(d))


def test_record_that_does_not_apply_is_refused(journal_dir):
    d, recs, fr = journal_dir
    bogus = {"op": "disk.rm", "name": "never-existed", "seq": len(recs) + 1}
    (d / JOURNAL).write_bytes(b"".join(fr) + encode(bogus))
    with pytest.raises(JournalCorrupt, match="does not apply"):
        recover(str(d))


def test_damaged_checkpoint_is_refused(journal_dir):
    d, recs, fr = journal_dir
    s = State()
    for r in recs[:3]:
        s.apply_wire(copy.deepcopy(r))
    cp = encode(format1(s))
    (d / CHECKPOINT).write_bytes(cp[:-1])
    with pytest.raises(JournalCorrupt, match="checkpoint"):
        recover(str(d))


@pytest.mark.parametrize("at", [0, 1, 5, "all"])
def test_checkpoint_newer_than_journal_records(journal_dir, at):
    """Crash after the checkpoint rename, before the journal was truncated."""
    d, recs, fr = journal_dir
    k = len(recs) if at == "all" else at
    s = State()
    for r in recs[:k]:
        s.apply_wire(copy.deepcopy(r))
    (d / CHECKPOINT).write_bytes(encode(format1(s)))
    r = recover(str(d))
    assert r.state.seq == len(recs)
    assert r.records == len(recs) - k
    assert image(r.state) == replayed(recs)


async def test_journal_checkpoints_and_truncates(tmp_path):
    d = tmp_path / "state"
    d.mkdir()
    recs = make_records(tmp_path, n_disks=30)
    state = State()
    j = Journal(str(d), state, checkpoint_bytes=1500)
    async with trio.open_nursery() as nursery:
        await nursery.start(j.run)
        sizes = []
        for r in recs:
            await j.commit(decode(r))
            if j._checkpointing:  # it runs beside the commits; let it finish here
                assert j._checkpoint_done is not None
                await j._checkpoint_done.wait()
            sizes.append((d / JOURNAL).stat().st_size)
        nursery.cancel_scope.cancel()
    j.close()
    assert j.checkpoints >= 2
    assert (d / CHECKPOINT).exists()
    assert max(sizes) < 1500 + 2000, "journal grew past the checkpoint threshold"
    assert any(b < a for a, b in zip(sizes, sizes[1:], strict=False)), "never truncated"
    assert image(state) == replayed(recs)
    r = recover(str(d))
    assert image(r.state) == image(state)
    assert r.records < len(recs)  # most come from the checkpoint


async def test_controller_with_small_checkpoint_survives_a_crash(tmp_path):
    """Records after a checkpoint replay on top of it; a copy taken mid-run (a crash image)
    and a clean restart both give the live state."""
    d = tmp_path / "state"
    img = tmp_path / "c.img"
    addr = f"unix:{d}/controller.sock"
    async with (open_controller_service(str(d), checkpoint_bytes=2000) as svc,
                open_controller(addr) as c):
        await c.call("container.add", name="c1", path=str(img), size=256 << 20)
        for i in range(40):
            await c.call("disk.create", name=f"d{i}", size=(i + 1) * 12345,
                         thick=i % 3 == 0)
            if i % 5 == 0:
                await c.call("disk.resize", name=f"d{i}", size=(i + 2) * 12345)
        for i in range(0, 40, 4):
            await c.call("disk.rm", name=f"d{i}")
        st = await c.call("status")
        assert st["checkpoints"] >= 1
        assert (d / JOURNAL).stat().st_size < 2000 + 1000
        live = image(svc.state)
        crash = tmp_path / "crash"
        # a crash image: journal.next (if a checkpoint is running), the journal,
        # then the checkpoint, so a checkpoint finishing meanwhile still yields a
        # consistent set (records seen twice are skipped on replay)
        crash.mkdir()
        if (d / JOURNAL_NEXT).exists():
            (crash / JOURNAL_NEXT).write_bytes((d / JOURNAL_NEXT).read_bytes())
        (crash / JOURNAL).write_bytes((d / JOURNAL).read_bytes())
        (crash / CHECKPOINT).write_bytes((d / CHECKPOINT).read_bytes())
    assert image(recover(str(crash)).state) == live
    assert image(recover(str(d)).state) == live

    def but_boot(w: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in w.items() if k not in ("boot", "seq")}

    async with open_controller_service(str(d), checkpoint_bytes=2000) as svc:
        # the same, except that a controller may journal its start ("controller.boot")
        assert but_boot(image(svc.state)) == but_boot(live)
        assert svc.state.boot - live["boot"] in (0, 1)
        assert check(svc.state) == []


# ---------------------------------------------------------------- record(): encode, then apply


@pytest.mark.parametrize("bad", ["unpackable", "oversized"])
async def test_record_that_cannot_be_encoded_changes_nothing(tmp_path, monkeypatch, bad):
    """Issue 6 (B): record() used to apply first, so an encoding error left the state
    changed and the sequence with a gap (a restart then refused: expected seq N,
    found N+1). Now nothing is applied or queued, and StateError is raised."""
    d = tmp_path / "state"
    d.mkdir()
    state = State()
    j = Journal(str(d), state)
    recs = make_records(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(j.run)
        for r in recs[:3]:
            await j.commit(decode(r))
        before = image(state)
        if bad == "unpackable":  # msgpack has no sets
            rec = DiskCreate("bad", 4 * B, 4 << 20, False, None, 1, {1, 2}, [])
        else:
            monkeypatch.setattr("controller.frames.MAX_JOURNAL_RECORD", 4096)
            rec = DiskCreate("x" * 5000, 4 * B, 4 << 20, False, None, 1, 1.0, [])
        with pytest.raises(StateError) as ei:
            j.record(rec)
        assert isinstance(ei.value.__cause__, codec.CodecError)
        monkeypatch.undo()
        assert image(state) == before and rec.name not in state.disks
        for r in recs[3:]:
            await j.commit(decode(r))
        nursery.cancel_scope.cancel()
    j.close()
    assert image(state) == replayed(recs)
    assert image(recover(str(d)).state) == image(state)


async def test_record_refused_by_the_state_queues_nothing(tmp_path):
    d = tmp_path / "state"
    d.mkdir()
    state = State()
    j = Journal(str(d), state)
    with pytest.raises(StateError):
        j.record(DiskRm("nope"))
    assert state.seq == 0 and not j._pending.frames
    j.close()


def test_a_state_dir_open_to_others_is_made_owner_only(tmp_path, caplog):
    """The journal maps every disk's data and the socket takes admin requests: a state
    dir made by hand with group or other access is closed to them at start."""
    import fcntl

    from controller.daemon import lock_state_dir

    d = tmp_path / "s"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)  # (the umask may have taken bits away)
    fd = lock_state_dir(str(d))
    try:
        assert os.stat(d).st_mode & 0o777 == 0o700
        assert "was mode 0755; made it 0700" in caplog.text
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
