"""The journal in a group (controller/groupstore.py, controller/grouprecovery.py) against
a real etcd member and real files: commits move the head; a new term recovers exactly
the committed records; a deposed term's appends are refused by etcd and ignored by
recovery; a kill -9 between a batch's fdatasync and its head move loses only that
unacknowledged batch; checkpoints retire the term files below them."""

from __future__ import annotations

import os
import signal
import sys
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import termrig
import trio
from etcdrig import EtcdProc
from stateimage import image
from termrig import running

from controller import grouprecovery
from controller.election import Election, LeadershipLost
from controller.etcd import open_etcd
from controller.frames import FrameReader, JournalCorrupt
from controller.grouprecovery import (
    Head,
    read_head,
    read_start,
    recover_files,
    recover_group,
    term_file,
)
from controller.groupstore import GroupStore, open_group_journal
from controller.journal import Journal
from controller.records import ContainerAdd, DiskCreate

PREFIX = "/g"
TTL = 2
WRITER = Path(__file__).with_name("termwriter.py")
ROOT = Path(__file__).resolve().parents[2]


def container() -> ContainerAdd:
    return ContainerAdd("c0", 1, "/dev/null/c0", 1 << 30, True)


def disk(name: str) -> DiskCreate:
    return DiskCreate(name, 1 << 20, 1 << 20, False, None, 1, 1.0, [])


def seqs_in(path: str) -> list[object]:
    """The seq of every frame of a journal file (None for a start frame)."""
    with open(path, "rb") as f:
        return [r.get("seq") if isinstance(r, dict) else r for r in FrameReader(f)]


def member(url: str, name: str) -> AbstractAsyncContextManager[Election]:
    return termrig.member(url, name, PREFIX, TTL)


async def test_commits_and_a_new_term_recover_exactly_the_committed_records(
        etcd: EtcdProc, tmp_path: Path) -> None:
    d = str(tmp_path / "state")
    os.mkdir(d)
    async with member(etcd.url, "a") as ea:
        ta = await ea.campaign()
        ja, rec = await open_group_journal(d, ea, ta)
        assert rec.head is None and rec.state.seq == 0
        async with running(ja) as stopped:
            await ja.commit(container())
            for i in range(5):
                await ja.commit(disk(f"a{i}"))
        assert stopped == []
        image_a = image(ja.state)
        assert await read_head(ea.client, PREFIX) == Head(ta.token, 6)
        assert read_start(os.path.join(d, term_file(ta.token, 0))) == {
            "term": ta.token, "prev_term": 0, "prev_head": 0}
        assert seqs_in(os.path.join(d, term_file(ta.token, 0))) == [None, 1, 2, 3, 4, 5, 6]
        await ea.resign()
    async with member(etcd.url, "b") as eb:
        tb = await eb.campaign()
        assert tb.token > ta.token
        jb, rec = await open_group_journal(d, eb, tb)
        assert image(rec.state) == image_a
        assert (rec.records, rec.cuts, rec.ignored) == (6, {ta.token: 6}, 0)
        async with running(jb):
            for i in range(3):
                await jb.commit(disk(f"b{i}"))
        head = await read_head(eb.client, PREFIX)
        assert head == Head(tb.token, 9)
        assert read_start(os.path.join(d, term_file(tb.token, 0)))["prev_head"] == 6
    again = recover_files(d, head)
    assert image(again.state) == image(jb.state)
    assert sorted(again.state.disks) == ["a0", "a1", "a2", "a3", "a4", "b0", "b1", "b2"]
    assert (again.records, again.cuts, again.ignored) == (9, {ta.token: 6, tb.token: 9}, 0)
    # records that count and are missing: recovery refuses, naming the term
    os.unlink(os.path.join(d, term_file(tb.token, 0)))
    with pytest.raises(JournalCorrupt, match=f"term {tb.token}: records up to seq 9 count"):
        recover_files(d, head)


async def test_a_deposed_term_appends_but_nothing_of_it_counts(
        etcd: EtcdProc, tmp_path: Path) -> None:
    d = str(tmp_path / "state")
    os.mkdir(d)
    async with member(etcd.url, "a") as ea, member(etcd.url, "ghost") as ghost, \
            member(etcd.url, "b") as eb:
        ta = await ea.campaign()
        rec = await recover_group(d, ea.client, PREFIX)
        # A's head moves go through an Election that never campaigned: its guarded_put
        # takes no shortcut on A's own knowledge, so every refusal below is etcd's
        ja = Journal(d, rec.state, store=GroupStore(d, ghost, ta, rec.head))
        async with running(ja) as stopped_a:
            await ja.commit(container())
            for i in range(3):
                await ja.commit(disk(f"a{i}"))  # seq 1..4
            # A's term is taken over: its key goes (as when its lease expires), B wins
            await ea.client.delete(ea.key)
            tb = await eb.campaign()
            jb, recb = await open_group_journal(d, eb, tb)
            assert recb.state.seq == 4 and recb.cuts == {ta.token: 4}
            async with running(jb):
                await jb.commit(disk("b0"))
                # the deposed leader goes on: its frame is written and fdatasync'ed,
                # its head move refused; the waiter gets an error, nothing is acknowledged
                with pytest.raises(RuntimeError, match="journal write failed") as err:
                    await ja.commit(disk("ghost"))
                assert isinstance(err.value.__cause__, LeadershipLost)
                assert "stale" in str(err.value.__cause__)
                await jb.commit(disk("b1"))
            # ...and a checkpoint of its state, the unacknowledged record in it
            ja.checkpoint_now_sync()
        assert len(stopped_a) == 1 and ja.durable_seq == 4
        a_file = os.path.join(d, term_file(ta.token, 0))
        assert seqs_in(a_file) == [None, 1, 2, 3, 4, 5]  # the deposed frame is on disk
        assert f"checkpoint.{ta.token}.5" in os.listdir(d)
        head = await read_head(eb.client, PREFIX)
        assert head == Head(tb.token, 6)
    rec = recover_files(d, head)
    assert image(rec.state) == image(jb.state)
    assert "ghost" not in rec.state.disks and sorted(rec.state.disks)[-2:] == ["b0", "b1"]
    assert rec.ignored == 1 and rec.checkpoint is None  # A's checkpoint is past its cut
    # the oracle can fail: had A's head move counted, its record would be there
    forged = recover_files(d, Head(ta.token, 5))
    assert "ghost" in forged.state.disks and image(forged.state) != image(jb.state)


async def test_kill9_between_fdatasync_and_head_move(etcd: EtcdProc, tmp_path: Path) -> None:
    d = str(tmp_path / "state")
    os.mkdir(d)
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "VIRTFS_FAULTS": "journal.before_head=crash@4"}
    with trio.fail_after(60):
        proc = await trio.run_process(
            [sys.executable, str(WRITER), etcd.url, PREFIX, d, "10"], env=env,
            capture_stdout=True, capture_stderr=True, check=False)
    lines = proc.stdout.decode().splitlines()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    token = int(lines[0].split()[1])
    assert lines[1:] == ["acked 1", "acked 2", "acked 3"]
    path = os.path.join(d, term_file(token, 0))
    assert seqs_in(path) == [None, 1, 2, 3, 4]  # seq 4 fdatasync'ed, never acknowledged
    async with member(etcd.url, "b") as eb:
        tb = await eb.campaign()  # once the killed writer's lease has expired
        assert await read_head(eb.client, PREFIX) == Head(token, 3)
        jb, rec = await open_group_journal(d, eb, tb)
        assert rec.state.seq == 3 and rec.ignored == 1
        assert sorted(rec.state.disks) == ["k0", "k1"]
        async with running(jb):
            assert await jb.commit(disk("b0")) == 4  # seq 4 again: another record
        head = await read_head(eb.client, PREFIX)
    again = recover_files(d, head)
    assert image(again.state) == image(jb.state)
    assert sorted(again.state.disks) == ["b0", "k0", "k1"]


async def test_checkpoints_retire_term_files_and_recovery_starts_from_them(
        etcd: EtcdProc, tmp_path: Path) -> None:
    d = str(tmp_path / "state")
    os.mkdir(d)
    async with member(etcd.url, "a") as ea:
        ta = await ea.campaign()
        ja, _ = await open_group_journal(d, ea, ta)
        async with running(ja):
            await ja.commit(container())
            for i in range(10):
                await ja.commit(disk(f"a{i}"))
            await ja._checkpoint()  # the background checkpoint, now
            for i in range(10, 15):
                await ja.commit(disk(f"a{i}"))
        # the checkpoint covers seq 11: file 0 (with the start frame) is retired
        assert sorted(os.listdir(d)) == [f"checkpoint.{ta.token}.11", f"journal.{ta.token}.1"]
        assert seqs_in(os.path.join(d, term_file(ta.token, 1))) == list(range(12, 17))
        head = await read_head(ea.client, PREFIX)
        rec = recover_files(d, head)
        assert image(rec.state) == image(ja.state)
        assert (rec.checkpoint, rec.records) == (f"checkpoint.{ta.token}.11", 5)
        await ea.resign()
    async with member(etcd.url, "b") as eb:
        tb = await eb.campaign()
        jb, rec = await open_group_journal(d, eb, tb)
        assert rec.checkpoint == f"checkpoint.{ta.token}.11" and rec.state.seq == 16
        async with running(jb):
            for i in range(3):
                await jb.commit(disk(f"b{i}"))
            jb.checkpoint_now_sync()  # as on a clean shutdown
            await jb.commit(disk("b3"))
        # A's files and checkpoint are below B's checkpoint: gone
        assert sorted(os.listdir(d)) == [f"checkpoint.{tb.token}.19", f"journal.{tb.token}.0"]
        head = await read_head(eb.client, PREFIX)
    again = recover_files(d, head)
    assert image(again.state) == image(jb.state)
    assert (again.checkpoint, again.records) == (f"checkpoint.{tb.token}.19", 1)
    assert again.cuts == {tb.token: 20, ta.token: 16}


async def test_recovery_starts_again_when_a_file_vanishes_meanwhile(
        etcd: EtcdProc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a stand-in for a deposed leader's checkpoint retiring files while they are read
    real = grouprecovery.recover_files
    calls: list[Head | None] = []

    def flaky(state_dir: str, head: Head | None) -> grouprecovery.GroupRecovery:
        calls.append(head)
        if len(calls) == 1:
            raise FileNotFoundError(f"{state_dir}/journal.1.0")
        return real(state_dir, head)

    monkeypatch.setattr(grouprecovery, "recover_files", flaky)
    async with open_etcd(etcd.url) as client:
        rec = await recover_group(str(tmp_path), client, PREFIX)
        assert len(calls) == 2 and rec.head is None and rec.state.seq == 0

        def gone(state_dir: str, head: Head | None) -> grouprecovery.GroupRecovery:
            calls.append(head)
            raise FileNotFoundError(f"{state_dir}/journal.1.0")

        calls.clear()
        monkeypatch.setattr(grouprecovery, "recover_files", gone)
        with pytest.raises(FileNotFoundError):
            await recover_group(str(tmp_path), client, PREFIX)
        assert len(calls) == grouprecovery.RETRIES
