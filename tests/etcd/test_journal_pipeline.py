"""The group journal's pipelined commit (controller/journal.py's publisher) against a
real etcd member and real files: while one head move is in flight, later batches are
written and fdatasync'ed; one move then covers all of them; a batch is acknowledged
only once a move that covers it has returned; and when the in-flight move is refused
(a deposed term), nothing after the refusal is acknowledged or published, and the
next term recovers none of it."""

from __future__ import annotations

import os
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import termrig
import trio
from etcdrig import EtcdProc
from stateimage import image
from termrig import running

from controller.election import Election, LeadershipLost, Term
from controller.frames import FrameReader
from controller.grouprecovery import Head, read_head, recover_files, recover_group, term_file
from controller.groupstore import GroupStore, open_group_journal
from controller.journal import Journal
from controller.records import ContainerAdd, DiskCreate

PREFIX = "/p"
TTL = 2


def container() -> ContainerAdd:
    return ContainerAdd("c0", 1, "/dev/null/c0", 1 << 30, True)


def disk(name: str) -> DiskCreate:
    return DiskCreate(name, 1 << 20, 1 << 20, False, None, 1, 1.0, [])


class GatedStore(GroupStore):
    """A GroupStore whose head moves wait at a gate (while ``gate`` is set) before the
    real, fenced txn; ``calls``: each move's seq; ``moved``: the last seq a move that
    returned covered."""

    def __init__(self, state_dir: str, election: Election, term: Term,
                 start: Head | None) -> None:
        super().__init__(state_dir, election, term, start)
        self.gate: trio.Event | None = None
        self.waiting = trio.Event()
        self.calls: list[int] = []
        self.moved = 0

    async def publish(self, last_seq: int) -> None:
        self.calls.append(last_seq)
        if self.gate is not None:
            self.waiting.set()
            await self.gate.wait()
        await super().publish(last_seq)
        self.moved = last_seq


def member(url: str, name: str) -> AbstractAsyncContextManager[Election]:
    return termrig.member(url, name, PREFIX, TTL)


def seqs_in(path: str) -> list[object]:
    with open(path, "rb") as f:
        return [r.get("seq") if isinstance(r, dict) else r for r in FrameReader(f)]


async def wait_synced(j: Journal, seq: int) -> None:
    with trio.fail_after(10):
        while j.synced_seq < seq:
            await trio.sleep(0.005)


async def test_one_head_move_covers_the_batches_written_behind_it(
        etcd: EtcdProc, tmp_path: Path) -> None:
    d = str(tmp_path / "state")
    os.mkdir(d)
    async with member(etcd.url, "a") as ea:
        ta = await ea.campaign()
        rec = await recover_group(d, ea.client, PREFIX)
        store = GatedStore(d, ea, ta, rec.head)
        j = Journal(d, rec.state, store=store)
        acked: list[tuple[int, int]] = []  # (seq, the head's seq when it was acknowledged)

        async def commit(name: str) -> None:
            seq = await j.commit(disk(name))
            acked.append((seq, store.moved))

        async with running(j) as stopped:
            await j.commit(container())  # seq 1
            store.gate = trio.Event()
            async with trio.open_nursery() as n:
                n.start_soon(commit, "p1")  # seq 2: its head move waits at the gate
                await store.waiting.wait()
                n.start_soon(commit, "p2")
                await wait_synced(j, 3)  # a batch of its own, fdatasync'ed meanwhile
                n.start_soon(commit, "p3")
                await wait_synced(j, 4)
                assert j.durable_seq == 1 and acked == []  # nothing acknowledged yet
                assert j.commits == 4 and store.calls == [1, 2]
                gate, store.gate = store.gate, None
                gate.set()
            assert j.durable_seq == 4
        assert stopped == []
        # one move covered seqs 3 and 4 (two batches), and none was acknowledged
        # before a move that covers it returned
        assert store.calls == [1, 2, 4]
        assert sorted(acked) == [(2, 2), (3, 4), (4, 4)]
        head = await read_head(ea.client, PREFIX)
        assert head == Head(ta.token, 4)
    assert image(recover_files(d, head).state) == image(j.state)


async def test_a_refused_head_move_acknowledges_nothing_after_it(
        etcd: EtcdProc, tmp_path: Path) -> None:
    d = str(tmp_path / "state")
    os.mkdir(d)
    async with member(etcd.url, "a") as ea, member(etcd.url, "ghost") as ghost, \
            member(etcd.url, "b") as eb:
        ta = await ea.campaign()
        rec = await recover_group(d, ea.client, PREFIX)
        # A's head moves go through an Election that never campaigned: every refusal
        # below is etcd's own, not A's shortcut on what it knows of its term
        store = GatedStore(d, ghost, ta, rec.head)
        ja = Journal(d, rec.state, store=store)
        results: dict[str, BaseException | int] = {}

        async def commit(name: str) -> None:
            try:
                results[name] = await ja.commit(disk(name))
            except RuntimeError as e:
                results[name] = e

        async with running(ja) as stopped:
            await ja.commit(container())
            await ja.commit(disk("a0"))  # seq 1, 2: acknowledged, the head is (A, 2)
            store.gate = trio.Event()
            async with trio.open_nursery() as n:
                n.start_soon(commit, "p1")  # seq 3: its head move is in flight...
                await store.waiting.wait()
                n.start_soon(commit, "p2")
                await wait_synced(ja, 4)
                n.start_soon(commit, "p3")
                await wait_synced(ja, 5)  # ...while seqs 4, 5 are fdatasync'ed behind it
                # A is deposed (its key goes, as at its lease's expiry) and B wins
                await ea.client.delete(ea.key)
                tb = await eb.campaign()
                store.gate.set()  # the move of seq 3 reaches etcd now: refused
            with trio.fail_after(5):
                while not stopped:
                    await trio.sleep(0.01)
            # the committer is stopped: a record after the refusal is refused at once
            with pytest.raises(RuntimeError, match="journal is closed"):
                ja.record(disk("late"))
        assert len(stopped) == 1 and "stale" in str(stopped[0])
        # nothing after the refusal was acknowledged, nor even published
        for name in ("p1", "p2", "p3"):
            err = results[name]
            assert isinstance(err, RuntimeError), (name, err)
            assert isinstance(err.__cause__, LeadershipLost)
        assert ja.durable_seq == 2 and ja.synced_seq == 5
        assert store.calls == [1, 2, 3] and store.moved == 2
        assert seqs_in(os.path.join(d, term_file(ta.token, 0))) == [None, 1, 2, 3, 4, 5]
        head = await read_head(eb.client, PREFIX)
        assert head == Head(ta.token, 2)  # the head names no seq past the refusal
        # B recovers A's acknowledged records only, the three behind the refusal ignored
        jb, recb = await open_group_journal(d, eb, tb)
        assert recb.state.seq == 2 and recb.ignored == 3
        assert sorted(recb.state.disks) == ["a0"]
        async with running(jb):
            assert await jb.commit(disk("b0")) == 3
        head = await read_head(eb.client, PREFIX)
    again = recover_files(d, head)
    assert image(again.state) == image(jb.state)
    assert sorted(again.state.disks) == ["a0", "b0"]
    # the oracle can fail: a head forged past the refusal brings A's records back
    forged = recover_files(d, Head(ta.token, 5))
    assert {"p1", "p2", "p3"} <= set(forged.state.disks)
