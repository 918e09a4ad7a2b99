"""A hot standby (controller/standby.py) against a real etcd member and real files: it
follows the head as a leader commits, across a new term (never applying a deposed
term's frames past its cut), and recovers in full when a checkpoint retires the files
it was reading (and starts a full recovery again when a file vanishes under it); its
state equals a full recovery at every head."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from etcdrig import EtcdProc
from stateimage import image
from test_termlog import PREFIX, container, disk, member, running

from controller import standby
from controller.election import Election
from controller.grouprecovery import GroupRecovery, Head, read_head, recover_files
from controller.groupstore import GroupStore, open_group_journal
from controller.standby import Standby


async def at_head(sb: Standby, client_election: Election, d: str) -> None:
    """Wait until sb reached the head now; its state must equal a full recovery's."""
    head = await read_head(client_election.client, PREFIX)
    assert head is not None
    with trio.fail_after(10):
        while sb.rec is None or sb.rec.state.seq != head.seq:
            await trio.sleep(0.02)
    assert image(sb.rec.state) == image(recover_files(d, head).state)


async def test_a_standby_follows_the_head_across_terms_and_checkpoints(
        etcd: EtcdProc, tmp_path: Path) -> None:
    d = str(tmp_path / "state")
    os.mkdir(d)
    async with member(etcd.url, "a") as ea, member(etcd.url, "ghost") as ghost, \
            member(etcd.url, "b") as eb, member(etcd.url, "s") as es, \
            trio.open_nursery() as n:
        sb = Standby(d, es.client, PREFIX)
        n.start_soon(sb.run)
        ta = await ea.campaign()
        ja, rec = await open_group_journal(d, ea, ta)
        ja.store = GroupStore(d, ghost, ta, rec.head)  # A's refusals come from etcd
        async with running(ja):
            await ja.commit(container())
            for i in range(20):
                await ja.commit(disk(f"a{i}"))
            await at_head(sb, es, d)
            assert sb.full_recoveries == 1 and sb.applied >= 20  # tailed, not replayed
            # A is deposed; B leads; A's late frame is written but never counts
            await ea.client.delete(ea.key)
            tb = await eb.campaign()
            jb, _ = await open_group_journal(d, eb, tb)
            async with running(jb):
                try:
                    await ja.commit(disk("ghost"))
                except RuntimeError:
                    pass
                for i in range(5):
                    await jb.commit(disk(f"b{i}"))
                await at_head(sb, es, d)
                assert "ghost" not in sb.rec.state.disks  # type: ignore[union-attr]
                assert sb.full_recoveries == 1
                # a checkpoint retires the files the standby reads: it recovers in full
                await jb._checkpoint()
                for i in range(3):
                    await jb.commit(disk(f"c{i}"))
                await at_head(sb, es, d)
                head = await read_head(eb.client, PREFIX)
                assert head is not None
                taken = await sb.take(head)
                assert sorted(taken.state.disks)[:2] == ["a0", "a1"]
                assert "c2" in taken.state.disks and "ghost" not in taken.state.disks
        n.cancel_scope.cancel()



async def test_a_file_retired_under_a_full_recovery_makes_the_standby_start_again(
        etcd: EtcdProc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = str(tmp_path / "state")
    os.mkdir(d)
    real = standby.recover_files
    tries: list[int] = []

    def vanishing(state_dir: str, head: Head | None) -> GroupRecovery:
        # the first full recovery finds a file gone, as when the leader's checkpoint
        # retires it meanwhile (that took a standby member down at 100 TiB)
        tries.append(head.seq if head else 0)
        if len(tries) == 1:
            raise FileNotFoundError(2, "No such file or directory", f"{d}/journal.1.0")
        return real(state_dir, head)

    monkeypatch.setattr(standby, "recover_files", vanishing)
    async with member(etcd.url, "a") as ea, member(etcd.url, "s") as es, \
            trio.open_nursery() as n:
        ta = await ea.campaign()
        ja, _ = await open_group_journal(d, ea, ta)
        async with running(ja):
            await ja.commit(container())
            await ja.commit(disk("a0"))
            sb = Standby(d, es.client, PREFIX)
            n.start_soon(sb.run)
            await at_head(sb, es, d)
        n.cancel_scope.cancel()
    assert len(tries) == 2 and sb.full_recoveries == 1
    assert sorted(sb.rec.state.disks) == ["a0"]  # type: ignore[union-attr]
