"""controller/etcd.py against a real etcd member: keys, txn, leases, watch (with a
crash and restart of etcd under it), several endpoints, and bounded calls."""

from __future__ import annotations

import signal
import time

import pytest
import trio
from etcdrig import EtcdProc, free_port

from controller.etcd import (
    Compare,
    EtcdError,
    EtcdRefused,
    EtcdUnavailable,
    Event,
    LeaseNotFound,
    OpDelete,
    OpGet,
    OpPut,
    WatchCompacted,
    open_etcd,
    parse_endpoints,
    prefix_end,
)


async def test_put_get_prefix_delete(etcd: EtcdProc) -> None:
    async with open_etcd(etcd.url) as c:
        p = await c.put("/t/a", b"1")
        await c.put("/t/b", "two")
        await c.put("/t/b", b"\x00\xff binary")
        await c.put("/u/x", b"outside")
        a = (await c.get("/t/a")).kv
        assert a is not None and a.value == b"1" and a.create_revision == p.revision
        assert a.mod_revision == p.revision and a.version == 1 and a.lease == 0
        b = (await c.get(b"/t/b")).kv
        assert b is not None and b.value == b"\x00\xff binary" and b.version == 2
        assert b.mod_revision > b.create_revision
        r = await c.get_prefix("/t/")
        assert [kv.key for kv in r.kvs] == [b"/t/a", b"/t/b"] and r.count == 2
        assert r.revision >= b.mod_revision
        assert (await c.get("/t/none")).kv is None
        limited = await c.get_prefix("/", limit=1)
        assert len(limited.kvs) == 1 and limited.more and limited.count == 3
        # a value put before is still readable at its revision
        assert (await c.get("/t/b", revision=b.create_revision)).kv.value == b"two"  # type: ignore[union-attr]
        d = await c.delete("/t/", prefix=True, prev_kv=True)
        assert d.deleted == 2 and sorted(kv.value for kv in d.prev_kvs) == [b"\x00\xff binary",
                                                                            b"1"]
        assert (await c.get_prefix("/t/")).kvs == ()
        assert (await c.delete("/t/a")).deleted == 0
        assert (await c.get("/u/x")).kv is not None


def test_prefix_end_and_endpoints() -> None:
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"a\xff\xff") == b"b"
    assert prefix_end(b"\xff") == b"\0"
    assert parse_endpoints(" http://a:1/ ,https://b:2") == ["http://a:1", "https://b:2"]
    for bad in ("", "a:2379", "unix:/x", "http://"):
        with pytest.raises(ValueError, match="etcd"):
            parse_endpoints(bad)
    with pytest.raises(ValueError, match="operand must be an int"):
        Compare("k", "version", "==", b"1")
    with pytest.raises(ValueError, match="target"):
        Compare("k", "size", "==", 1)  # type: ignore[arg-type]


async def test_txn_compares(etcd: EtcdProc) -> None:
    async with open_etcd(etcd.url) as c:
        # create only if absent: once succeeds, the second time fails and reads instead
        won = await c.txn([Compare("/l", "create_revision", "==", 0)], [OpPut("/l", "me")],
                          [OpGet("/l")])
        assert won.succeeded and won.responses[0].revision == won.revision
        lost = await c.txn([Compare("/l", "create_revision", "==", 0)], [OpPut("/l", "you")],
                           [OpGet("/l")])
        assert not lost.succeeded and lost.revision == won.revision
        kv = lost.responses[0].kv  # type: ignore[union-attr]
        assert kv is not None and kv.value == b"me" and kv.create_revision == won.revision
        # each target, holding and not
        cases = [(Compare("/l", "version", "==", 1), True),
                 (Compare("/l", "version", ">", 1), False),
                 (Compare("/l", "mod_revision", "==", won.revision), True),
                 (Compare("/l", "mod_revision", "<", won.revision), False),
                 (Compare("/l", "value", "==", b"me"), True),
                 (Compare("/l", "value", "!=", "me"), False),
                 (Compare("/l", "lease", "==", 0), True),
                 (Compare("/l", "create_revision", "!=", won.revision), False)]
        for cmp, holds in cases:
            r = await c.txn([cmp], [OpGet("/l")], [])
            assert r.succeeded is holds, cmp
        # several compares are all-or-nothing, and the branch's ops all run at one revision
        r = await c.txn([Compare("/l", "value", "==", "me"), Compare("/l", "version", "==", 9)],
                        [OpDelete("/l")], [OpPut("/l", "v2"), OpPut("/m", "x"), OpGet("/", True)])
        assert not r.succeeded and len(r.responses) == 3
        assert r.responses[2].count == 2  # type: ignore[union-attr]
        assert (await c.get("/l")).kv.value == b"v2"  # type: ignore[union-attr]
        r = await c.txn([Compare("/l", "version", "==", 2)], [OpDelete("/", prefix=True)])
        assert r.succeeded and r.responses[0].deleted == 2  # type: ignore[union-attr]


async def test_lease_expiry_deletes_keys(etcd: EtcdProc) -> None:
    async with open_etcd(etcd.url) as c:
        lease = await c.lease_grant(2)
        assert lease.ttl == 2
        await c.put("/held", "x", lease=lease.id)
        info = await c.lease_time_to_live(lease.id, keys=True)
        assert info.granted_ttl == 2 and 0 < info.ttl <= 2 and info.keys == (b"/held",)
        assert (await c.get("/held")).kv.lease == lease.id  # type: ignore[union-attr]
        # kept alive past its TTL, the key stays
        for _ in range(4):
            await trio.sleep(0.7)
            assert await c.lease_keepalive(lease.id) == 2
        assert (await c.get("/held")).kv is not None
        # left alone, it expires and takes the key with it
        start = time.monotonic()
        while (await c.get("/held")).kv is not None:
            assert time.monotonic() - start < 5, "key outlived its lease"
            await trio.sleep(0.1)
        assert time.monotonic() - start > 1.0
        assert (await c.lease_time_to_live(lease.id)).ttl == -1
        with pytest.raises(LeaseNotFound, match="not found"):
            await c.lease_keepalive(lease.id)
        with pytest.raises(LeaseNotFound):
            await c.lease_revoke(lease.id)
        with pytest.raises(LeaseNotFound, match="lease not found"):
            await c.put("/k", "v", lease=lease.id)
        # revoke deletes at once
        other = await c.lease_grant(30)
        await c.put("/held2", "y", lease=other.id)
        await c.lease_revoke(other.id)
        assert (await c.get("/held2")).kv is None


async def _collect(w: object, n: int, into: list[Event]) -> None:
    async for ev in w:  # type: ignore[attr-defined]
        into.append(ev)
        if len(into) == n:
            return


async def test_watch_sees_puts_and_deletes_in_order(etcd: EtcdProc) -> None:
    async with open_etcd(etcd.url) as c:
        before = await c.put("/w/old", "0")
        events: list[Event] = []
        async with c.watch("/w/", prefix=True, prev_kv=True) as w, trio.open_nursery() as n:
            n.start_soon(_collect, w, 5, events)
            await trio.sleep(0.2)
            await c.put("/w/a", "1")
            await c.put("/w/b", "2")
            await c.put("/elsewhere", "no")
            await c.put("/w/a", "3")
            await c.txn([], [OpDelete("/w/a"), OpDelete("/w/old")])
            with trio.fail_after(5):
                while len(events) < 5:
                    await trio.sleep(0.02)
        got = [(e.type, e.kv.key, e.kv.value) for e in events]
        assert got == [("PUT", b"/w/a", b"1"), ("PUT", b"/w/b", b"2"), ("PUT", b"/w/a", b"3"),
                       ("DELETE", b"/w/a", b""), ("DELETE", b"/w/old", b"")]
        revs = [e.revision for e in events]
        assert revs == sorted(revs) and revs[0] > before.revision and revs[3] == revs[4]
        assert events[2].prev_kv is not None and events[2].prev_kv.value == b"1"
        assert w.next_revision == revs[-1] + 1
        # from an old revision, history replays
        async with c.watch("/w/old", start_revision=before.revision) as w2:
            first = await w2.__anext__()
            assert (first.type, first.revision) == ("PUT", before.revision)


async def test_watch_resumes_after_etcd_restart(etcd: EtcdProc) -> None:
    async with open_etcd(etcd.url, timeout=2) as c, open_etcd(etcd.url) as writer:
        events: list[Event] = []
        async with c.watch("/r/", prefix=True) as w, trio.open_nursery() as n:
            n.start_soon(_collect, w, 6, events)
            await trio.sleep(0.2)
            await writer.put("/r/1", "a")
            await writer.put("/r/2", "b")
            with trio.fail_after(5):
                while len(events) < 2:
                    await trio.sleep(0.02)
            etcd.kill()  # kill -9: the gateway's stream breaks mid-watch
            await trio.sleep(0.3)
            await trio.to_thread.run_sync(etcd.start)
            # written while the watch is (most likely) still reconnecting
            await writer.put("/r/3", "c")
            await writer.delete("/r/1")
            await writer.put("/r/2", "d")
            await writer.delete("/r/", prefix=True)
            with trio.fail_after(10):
                while len(events) < 6:
                    await trio.sleep(0.02)
        assert w.reconnects >= 1
        got = [(e.type, e.kv.key, e.kv.value) for e in events]
        assert got == [("PUT", b"/r/1", b"a"), ("PUT", b"/r/2", b"b"), ("PUT", b"/r/3", b"c"),
                       ("DELETE", b"/r/1", b""), ("PUT", b"/r/2", b"d"),
                       ("DELETE", b"/r/2", b"")]
        revs = [e.revision for e in events]
        assert len(set(revs)) == 6 and revs == sorted(revs), revs  # no duplicate, no gap


async def test_watch_of_compacted_revision_says_so(etcd: EtcdProc) -> None:
    async with open_etcd(etcd.url) as c:
        first = await c.put("/c", "1")
        await c.put("/c", "2")
        last = await c.put("/c", "3")
        await c.compact(last.revision)
        with pytest.raises(WatchCompacted, match=rf"revision {first.revision} is compacted") as e:
            async with c.watch("/c", start_revision=first.revision) as w:
                await w.__anext__()
        assert e.value.compact_revision == last.revision


async def test_endpoints_errors_and_bounds(etcd: EtcdProc) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    # a dead endpoint first: the next one answers, and is used from then on
    async with open_etcd(f"{dead},{etcd.url}") as c:
        await c.put("/e", "1")
        assert c.endpoint == etcd.url
        with pytest.raises(EtcdRefused, match=r"^etcd http://127\.0\.0\.1:\d+/v3/kv/put: ") as e:
            await c.put("/e", "1", lease=1234)
        assert "\n" not in str(e.value)
    async with open_etcd(f"{dead},{dead}") as c:
        with pytest.raises(EtcdUnavailable, match="no endpoint answered") as e2:
            await c.get("/e")
        assert "\n" not in str(e2.value)
    # a frozen member: every call still returns within the timeout
    async with open_etcd(etcd.url, timeout=0.5) as c:
        etcd.signal(signal.SIGSTOP)
        try:
            calls = (lambda: c.get("/e"), lambda: c.put("/e", "2"),
                     lambda: c.lease_keepalive(1))
            for call in calls:
                start = time.monotonic()
                with pytest.raises(EtcdUnavailable, match=r"no answer within 0\.5 s"):
                    await call()
                assert time.monotonic() - start < 1.5
        finally:
            etcd.signal(signal.SIGCONT)
        assert (await c.get("/e")).kv is not None
    # a watch gives up when no endpoint comes back within reconnect_for
    async with open_etcd(etcd.url, timeout=0.5) as c:
        async with c.watch("/e", reconnect_for=1) as w:
            etcd.kill()
            with pytest.raises(EtcdUnavailable, match="no endpoint took it back within 1 s"):
                await w.__anext__()
    assert issubclass(EtcdUnavailable, EtcdError) and issubclass(WatchCompacted, EtcdRefused)


async def test_watch_idle_timeout_reconnects_a_silent_stream(etcd: EtcdProc) -> None:
    # a frozen member keeps the connection open and says nothing: only idle_timeout
    # notices; the watch retries until the member is back, then resumes
    async with open_etcd(etcd.url, timeout=0.5) as c, open_etcd(etcd.url) as writer:
        events: list[Event] = []
        async with c.watch("/i", idle_timeout=0.3) as w, trio.open_nursery() as n:
            n.start_soon(_collect, w, 2, events)
            await trio.sleep(0.1)
            await writer.put("/i", "1")
            etcd.signal(signal.SIGSTOP)
            try:
                await trio.sleep(1.5)
            finally:
                etcd.signal(signal.SIGCONT)
            assert w.reconnects >= 1
            await writer.put("/i", "2")
            with trio.fail_after(5):
                while len(events) < 2:
                    await trio.sleep(0.02)
        assert [e.kv.value for e in events] == [b"1", b"2"]
