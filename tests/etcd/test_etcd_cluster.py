"""The client and the election on a three-member etcd cluster: the loss of the member
in use is ridden out (requests, a watch and a term move to another), the loss of
quorum bounds every call and ends the term, and service resumes when quorum is back."""

from __future__ import annotations

import time

import pytest
import trio
from etcdrig import EtcdProc

from controller.election import LeadershipLost, open_election
from controller.etcd import Compare, EtcdClient, EtcdUnavailable, Event, OpPut, open_etcd


async def put_once(c: EtcdClient, key: str, value: str, within: float = 10) -> None:
    """Create key = value, retrying while etcd is unavailable (a write whose answer was
    lost may have been applied, so the retry is guarded: create only if absent)."""
    with trio.fail_after(within):
        while True:
            try:
                await c.txn([Compare(key, "create_revision", "==", 0)], [OpPut(key, value)])
                return
            except EtcdUnavailable:
                await trio.sleep(0.1)


async def test_a_member_lost_then_quorum_lost_then_back(etcd3: list[EtcdProc]) -> None:
    urls = ",".join(m.url for m in etcd3)
    ttl = 3
    async with open_etcd(urls, timeout=1) as c, open_etcd(urls, timeout=1) as c2, \
            open_election(c2, "/g", member_id="a", address="x", ttl=ttl) as a:
        term = await a.campaign()
        events: list[Event] = []

        async def collect(w: object) -> None:
            async for ev in w:  # type: ignore[attr-defined]
                events.append(ev)

        async with c.watch("/k/", prefix=True) as w, trio.open_nursery() as n:
            n.start_soon(collect, w)
            await c.put("/k/1", "a")
            # kill -9 the member the client uses: writes, the watch and the term move on
            used = next(m for m in etcd3 if m.url == c.endpoint)
            used.kill()  # if it led the raft group, the others elect a leader first
            await put_once(c, "/k/2", "b")
            assert c.endpoint != used.url
            await trio.sleep(ttl + 0.5)  # past the lease: its keep-alive found a member
            assert term.lost is None
            assert await a.guarded_put("/k/3", "c", term.token) > term.token
            with trio.fail_after(10):
                while len(events) < 3:
                    await trio.sleep(0.02)
            assert [e.kv.value for e in events] == [b"a", b"b", b"c"]
            # and a second member: no quorum; every call returns within its bound
            other = next(m for m in etcd3 if m is not used and m.url != c.endpoint)
            other.kill()
            start = time.monotonic()
            with pytest.raises(EtcdUnavailable):
                await c.put("/k/4", "d")
            with pytest.raises(EtcdUnavailable):
                await c.get("/k/1")
            assert time.monotonic() - start < 7
            # the leader learns within its lease that it no longer leads
            with trio.fail_after(ttl + 2):
                await term.wait_lost()
            with pytest.raises(LeadershipLost):
                await a.guarded_put("/k/5", "e", term.token)
            # quorum back: service resumes by itself, the watch included
            await trio.to_thread.run_sync(other.start)
            await put_once(c, "/k/6", "f", within=15)
            with trio.fail_after(10):
                again = await a.campaign()
            assert again.token > term.token
            with trio.fail_after(10):
                while not events or events[-1].kv.value != b"f":
                    await trio.sleep(0.02)
            n.cancel_scope.cancel()
        values = [e.kv.value for e in events]
        assert values[:3] == [b"a", b"b", b"c"] and values[-1] == b"f"
        assert b"e" not in values
