"""controller/election.py against a real etcd member: one leader among campaigners,
tokens that only grow, writes fenced by a stale token, and a leader frozen (SIGSTOP)
past its lease that is deposed, refused and told so when it thaws."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from etcdrig import EtcdProc
from rig import PROC_LOGS

from controller.election import Leader, LeadershipLost, open_election
from controller.etcd import open_etcd

CAMPAIGNER = Path(__file__).with_name("campaigner.py")
ROOT = Path(__file__).resolve().parents[2]
TTL = 2


async def test_two_campaigners_one_leads(etcd: EtcdProc) -> None:
    async with open_etcd(etcd.url) as c1, open_etcd(etcd.url) as c2, open_etcd(etcd.url) as c3, \
            open_election(c1, "/g", member_id="a", address="unix:/a", ttl=TTL) as a, \
            open_election(c2, "/g", member_id="b", address="unix:/b", ttl=TTL) as b, \
            open_election(c3, "/g", member_id="watcher", address="", ttl=TTL) as w:
        seen: list[Leader | None] = []

        async def observe() -> None:
            async with w.observe() as leaders:
                async for leader in leaders:
                    seen.append(leader)

        async with trio.open_nursery() as n:
            n.start_soon(observe)
            with trio.fail_after(3):
                while not seen:
                    await trio.sleep(0.02)
            ta = await a.campaign()
            assert await a.campaign() is ta  # already leading: the same term
            b_term: list[int] = []

            async def campaign_b() -> None:
                b_term.append((await b.campaign()).token)

            n.start_soon(campaign_b)
            await trio.sleep(TTL + 1)  # well past a lease: a's keep-alive holds it
            assert b_term == [] and ta.lost is None
            now = await w.leader()
            assert now is not None
            assert (now.id, now.address, now.token) == ("a", "unix:/a", ta.token)
            await a.resign()
            assert ta.lost == "resigned"
            with trio.fail_after(3):
                while not b_term:
                    await trio.sleep(0.02)
            assert b_term[0] > ta.token
            with trio.fail_after(3):
                while len(seen) < 4:
                    await trio.sleep(0.02)
            n.cancel_scope.cancel()
        assert [(x.id, x.token) if x else None for x in seen] == [
            None, ("a", ta.token), None, ("b", b_term[0])]


async def test_guarded_put_fences_a_stale_token(etcd: EtcdProc) -> None:
    async with open_etcd(etcd.url) as c1, open_etcd(etcd.url) as c2, \
            open_election(c1, "/g", member_id="a", address="tcp://a:7800", ttl=TTL) as a, \
            open_election(c2, "/g", member_id="b", address="tcp://b:7800", ttl=TTL) as b:
        ta = await a.campaign()
        r1 = await a.guarded_put("/g/head", "a:1", ta.token)
        # the leader key goes (its lease revoked by an operator, say): b takes over
        await c2.delete(a.key)
        with trio.fail_after(3):
            tb = await b.campaign()
        assert tb.token > ta.token > 0
        # a's write with its old token is refused by etcd, and names who leads now: as
        # from a writer that has not heard of the new term (a fresh Election knows no term)
        async with open_election(c1, "/g", member_id="a", address="tcp://a:7800",
                                 ttl=TTL) as unaware:
            with pytest.raises(LeadershipLost, match=rf"token {ta.token} is stale, b at "
                               rf"tcp://b:7800 \(token {tb.token}\) leads"):
                await unaware.guarded_put("/g/head", "a:2", ta.token)
        # a itself has heard (its watch of the key): it refuses before asking etcd
        with trio.fail_after(2):
            await ta.wait_lost()
        with pytest.raises(LeadershipLost, match=f"term {ta.token} ended: the leader key was "
                           "deleted"):
            await a.guarded_put("/g/head", "a:3", ta.token)
        with pytest.raises(LeadershipLost, match=f"term {ta.token} ended"):
            ta.check()
        head = (await c1.get("/g/head")).kv
        assert head is not None and head.value == b"a:1" and head.mod_revision == r1
        assert await b.guarded_put("/g/head", "b:1", tb.token) > r1
        # a fence on a token that never led, and on no leader at all
        with pytest.raises(LeadershipLost, match="is stale"):
            await b.guarded_put("/g/head", "x", tb.token + 1000)
        await b.resign()
        with pytest.raises(LeadershipLost, match="no one leads"):
            await b.guarded_put("/g/head", "b:2", tb.token)
        assert (await c1.get("/g/head")).kv.value == b"b:1"  # type: ignore[union-attr]


async def test_lead_cancels_its_work_when_the_term_ends(etcd: EtcdProc) -> None:
    async with open_etcd(etcd.url) as c1, open_etcd(etcd.url) as c2, \
            open_election(c1, "/g", member_id="a", address="x", ttl=TTL) as a:
        # a body that ends: we resign, and the key is gone
        async with a.lead() as term:
            assert (await c2.get(a.key)).kv.create_revision == term.token  # type: ignore[union-attr]
        assert (await c2.get(a.key)).kv is None and term.lost == "resigned"
        # a body that would run forever: cancelled promptly when the key is deleted
        start = 0.0
        with pytest.raises(LeadershipLost, match="the leader key was deleted"):
            async with a.lead() as term:
                start = time.monotonic()
                await c2.delete(a.key)
                await trio.sleep_forever()
        assert time.monotonic() - start < 1.0
        # a new term after that one has a larger token
        async with a.lead() as again:
            assert again.token > term.token


def start_campaigner(url: str, member: str, out: Path, log: Path) -> subprocess.Popen[bytes]:
    """campaigner.py as a process on /g, writing /g/head; its stderr is checked for
    tracebacks (PROC_LOGS)."""
    PROC_LOGS.append(log)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(out, "wb") as o, open(log, "wb") as e:
        return subprocess.Popen([sys.executable, str(CAMPAIGNER), url, "/g", member, str(TTL),
                                 "/g/head"], stdout=o, stderr=e, env=env, cwd=out.parent)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def _wait_line(path: Path, prefix: str, timeout: float) -> str:
    with trio.fail_after(timeout):
        while True:
            for line in _lines(path):
                if line.startswith(prefix):
                    return line
            await trio.sleep(0.02)


async def test_frozen_leader_is_deposed_and_fenced(etcd: EtcdProc, tmp_path: Path) -> None:
    out = tmp_path / "a.out"
    proc = start_campaigner(etcd.url, "a", out, tmp_path / "a.log")
    try:
        ta = int((await _wait_line(out, "leader ", 15)).split()[1])
        await _wait_line(out, "put 2 ", 5)
        async with open_etcd(etcd.url) as c, \
                open_election(c, "/g", member_id="b", address="y", ttl=TTL) as b:
            tb_box: list[int] = []

            async def campaign_b() -> None:
                tb_box.append((await b.campaign()).token)

            async with trio.open_nursery() as n:
                n.start_soon(campaign_b)
                await trio.sleep(0.5)
                assert tb_box == []
                proc.send_signal(signal.SIGSTOP)
                stopped = time.monotonic()
                with trio.fail_after(TTL + 4):
                    while not tb_box:
                        await trio.sleep(0.02)
            took_over = time.monotonic() - stopped
            tb = tb_box[0]
            assert tb > ta and TTL - 1 < took_over < TTL + 3, took_over
            rb = await b.guarded_put("/g/head", "b 0", tb)
            proc.send_signal(signal.SIGCONT)
            thawed = time.monotonic()
            lost = await _wait_line(out, "lost ", 3)
            assert time.monotonic() - thawed < 2.0, "the thawed leader learnt it too late"
            assert proc.wait(10) == 0
            lines = _lines(out)
            # every write of a's that etcd took was before b's term; none after
            puts = [int(x.split()[2]) for x in lines if x.startswith("put ")]
            assert puts and max(puts) < tb, (lines, tb)
            assert any(x.startswith("refused ") for x in lines), lines
            head = (await c.get("/g/head")).kv
            assert head is not None and head.value == b"b 0" and head.mod_revision == rb
            # and the key's whole history agrees: a's values only before tb
            history: list[tuple[int, bytes]] = []
            async with c.watch("/g/head", start_revision=1) as w:
                async for ev in w:
                    history.append((ev.revision, ev.kv.value))
                    if ev.revision >= rb:
                        break
            assert [r for r, v in history if v.startswith(b"a ")] == sorted(puts)
            assert all(r < tb for r, v in history if v.startswith(b"a "))
            assert "lease" in lost or "deleted" in lost or "taken" in lost, lost
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()


async def test_terms_and_campaigns_ride_out_an_etcd_restart(
        etcd: EtcdProc, caplog: pytest.LogCaptureFixture) -> None:
    # a leader whose lease outlasts etcd's restart keeps its term (etcd keeps leases
    # across a restart and renews them when it elects itself again); a campaign made
    # while etcd is down retries, then waits its turn
    ttl = 6
    async with open_etcd(etcd.url, timeout=1) as c1, open_etcd(etcd.url, timeout=1) as c2, \
            open_election(c1, "/g", member_id="a", address="x", ttl=ttl) as a, \
            open_election(c2, "/g", member_id="b", address="y", ttl=ttl) as b:
        ta = await a.campaign()
        etcd.kill()
        b_term: list[int] = []

        async def campaign_b() -> None:
            b_term.append((await b.campaign()).token)

        async with trio.open_nursery() as n:
            n.start_soon(campaign_b)
            await trio.sleep(0.5)
            await trio.to_thread.run_sync(etcd.start)
            assert await a.guarded_put("/g/head", "a after restart", ta.token) > ta.token
            await trio.sleep(1)
            assert ta.lost is None and b_term == []
            await a.resign()
            with trio.fail_after(5):
                while not b_term:
                    await trio.sleep(0.02)
        assert b_term[0] > ta.token
        assert any(r.getMessage().startswith("campaign for /g/leader: etcd: no endpoint "
                                             "answered") for r in caplog.records)
