"""Leader election on etcd, and writes fenced by the leader's token (issue 14).

The recipe is etcd's own (its ``concurrency`` package), on one key, ``PREFIX/leader``:

- **campaign**: grant a lease and keep it alive (a renewal every TTL/3); then a txn puts
  the leader key, attached to the lease, only if the key does not exist (its
  create_revision is 0). If it exists, watch it until it is deleted (its holder resigned,
  or its lease expired and etcd deleted it) and try again.
- **token**: the leader key's create_revision. etcd's revision only grows, so each term's
  token is larger than every earlier term's; a term is named by it.
- **fencing**: ``guarded_put`` writes only in a txn that compares the leader key's
  create_revision with the writer's token. Once a term has ended, its key is gone or
  was re-created at a larger revision, so every write of the old leader is refused by
  etcd itself, however late it arrives and whatever the old leader's clock believes
  (docs/ha.md, "etcd client and election").
- **losing it**: a leader learns its term ended when its keep-alive is not answered
  within the TTL (counted from the send of the last answered one, so the lease cannot
  have outlived our count), when etcd says the lease is gone, when the key is deleted
  or re-created (a watch on it), or when a fenced write is refused. ``lead()`` runs
  "while I am leader" work in a cancel scope that is cancelled then.

``open_election`` owns the background tasks (keep-alive, the key's watch) in its nursery.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from .etcd import (
    Compare,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    KeyValue,
    LeaseNotFound,
    Op,
    OpDelete,
    OpGet,
    OpPut,
    RangeResponse,
    TxnResponse,
    WatchCompacted,
)

log = logging.getLogger(__name__)

DEFAULT_TTL = 10  # s: the leader's lease, as the agents' (a failover starts within it)


class LeadershipLost(Exception):
    """Our term as leader ended (or a write was fenced by a later term); str() says why."""


@dataclass(frozen=True)
class Leader:
    """Who leads: the member's id and address (from the leader key's value), its token
    (the key's create_revision) and its lease."""

    id: str
    address: str
    token: int
    lease: int

    @classmethod
    def from_kv(cls, kv: KeyValue) -> Leader:
        """The leader a leader key names; a value that is not our JSON is shown raw."""
        try:
            d = json.loads(kv.value)
            ident, address = str(d["id"]), str(d["address"])
        except (ValueError, TypeError, KeyError):
            ident, address = kv.value.decode(errors="replace"), ""
        return cls(ident, address, kv.create_revision, kv.lease)

    def __str__(self) -> str:
        return f"{self.id} at {self.address or '?'} (token {self.token})"


class Term:
    """One term of ours as leader: its token and lease, and whether it has ended."""

    def __init__(self, token: int, lease: int, ttl: int, expires: float) -> None:
        self.token = token
        self.lease = lease
        self.ttl = ttl
        self.expires = expires  # trio.current_time() by which the lease may be gone
        self.lost: str | None = None
        self._lost = trio.Event()
        # the run's clock, for in_force() in worker threads (trio.current_time() needs
        # the trio thread); SystemClock reads CLOCK_MONOTONIC, which runs during SIGSTOP
        self._clock = trio.lowlevel.current_clock()

    def lose(self, reason: str) -> None:
        """End the term (first reason wins); wakes wait_lost()."""
        if self.lost is None:
            self.lost = reason
            self._lost.set()

    def check(self) -> None:
        """Raise LeadershipLost if the term has ended, or if the lease may have expired
        by our own clock (no keep-alive answered for a TTL): a cheap test before acting
        on leadership. It never replaces the fence of ``guarded_put``."""
        if self.lost is None and trio.current_time() >= self.expires:
            self.lose(f"no keep-alive answered within the lease's {self.ttl} s")
        if self.lost is not None:
            raise LeadershipLost(f"term {self.token} ended: {self.lost}")

    def in_force(self) -> bool:
        """Whether the term still holds by what we know: not ended, and its lease not
        past by our own clock (as check()). Read-only and safe from any thread: a worker
        thread asks it before each container write (writegate.gate); it changes nothing
        (the trio side's check() and keep-alive end the term) and only reads the clock.
        A leader resumed after a pause (SIGSTOP) past its lease gets False at once."""
        return self.lost is None and self._clock.current_time() < self.expires

    async def wait_lost(self) -> str:
        """Wait until the term ends; returns why."""
        await self._lost.wait()
        assert self.lost is not None
        return self.lost


class Election:
    """Campaign, resign, observe and fence on the key ``PREFIX/leader``; made by
    open_election. Methods raise EtcdError where etcd fails them (campaign retries)."""

    def __init__(self, client: EtcdClient, prefix: str, member_id: str, address: str,
                 ttl: int, nursery: trio.Nursery) -> None:
        self.client = client
        self.key = prefix.rstrip("/") + "/leader"
        self.member_id = member_id
        self.address = address
        self.ttl = ttl
        self.term: Term | None = None  # the current or last term of ours
        self._value = json.dumps({"id": member_id, "address": address}).encode()
        self._nursery = nursery
        self._lease: Term | None = None  # a lease kept alive for the next campaign txn

    # ------------------------------------------------------------ reading

    async def leader(self) -> Leader | None:
        """Who leads now (a linearizable read), or None."""
        kv = (await self.client.get(self.key)).kv
        return Leader.from_kv(kv) if kv else None

    @asynccontextmanager
    async def observe(self) -> AsyncIterator[AsyncIterator[Leader | None]]:
        """``async with e.observe() as leaders: async for leader in leaders:`` who leads
        now, then each change (None while no one does)."""
        gen = self._observe()
        try:
            yield gen
        finally:
            await gen.aclose()

    async def _observe(self) -> AsyncGenerator[Leader | None, None]:
        last: Leader | None | bool = False  # False: nothing yielded yet
        while True:
            r = await self.client.get(self.key)
            current = Leader.from_kv(r.kv) if r.kv else None
            if current != last:
                last = current
                yield current
            try:
                async with self.client.watch(self.key, start_revision=r.revision + 1) as w:
                    async for ev in w:
                        current = None if ev.type == "DELETE" else Leader.from_kv(ev.kv)
                        if current != last:
                            last = current
                            yield current
            except WatchCompacted:
                continue  # re-read, then watch on from there

    # ------------------------------------------------------------ campaigning

    async def campaign(self) -> Term:
        """Wait until we lead; returns the term. Retries while etcd is unavailable
        (logging it once), and waits on the leader key while someone else leads."""
        if self.term is not None and self.term.lost is None:
            return self.term
        delay = 0.1
        warned = False
        while True:
            try:
                lease = await self._alive_lease()
                r = await self.client.txn([Compare(self.key, "create_revision", "==", 0)],
                                          [OpPut(self.key, self._value, lease.lease)],
                                          [OpGet(self.key)])
            except (EtcdUnavailable, LeaseNotFound) as e:
                if isinstance(e, LeaseNotFound) and self._lease is not None:
                    self._lease.lose("the lease expired")  # grant another next time
                if not warned:
                    log.warning("campaign for %s: %s; retrying", self.key, e)
                    warned = True
                await trio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            kv = None if r.succeeded else _range_kv(r)
            if r.succeeded or (kv is not None and kv.lease == lease.lease):
                # ours: won now, or by an earlier try whose answer was lost
                lease.token = r.revision if kv is None else kv.create_revision
                self._lease = None
                self.term = lease
                self._nursery.start_soon(self._watch_key, lease)
                log.info("%s leads %s (token %d)", self.member_id, self.key, lease.token)
                return lease
            if kv is not None:
                await self._wait_gone(r.revision, lease)

    async def _alive_lease(self) -> Term:
        """The lease for the next campaign txn: the one kept alive, or a new one."""
        if self._lease is not None and self._lease.lost is None:
            return self._lease
        start = trio.current_time()
        g = await self.client.lease_grant(self.ttl)
        t = Term(0, g.id, g.ttl, start + g.ttl)
        self._lease = t
        self._nursery.start_soon(self._keep_alive, t)
        return t

    async def _wait_gone(self, revision: int, lease: Term) -> None:
        """Wait until the leader key changes after revision (deleted, mostly), or our
        lease is lost (then a new one is granted), or the watch fails (re-read)."""
        async def until_deleted() -> None:
            try:
                async with self.client.watch(self.key, start_revision=revision + 1) as w:
                    async for ev in w:
                        if ev.type == "DELETE":
                            return
            except EtcdError as e:
                log.debug("campaign's watch of %s: %s", self.key, e)
                await trio.sleep(0.2)

        await _until_lost(lease, until_deleted)

    async def _keep_alive(self, t: Term) -> None:
        """Renew t's lease every TTL/3 until the term ends; end it when no renewal is
        answered before the lease may have expired, or etcd says the lease is gone."""
        interval = t.ttl / 3
        next_send = trio.current_time() + interval
        failing = False
        while t.lost is None:
            with trio.move_on_at(min(next_send, t.expires)):
                await t.wait_lost()
                break
            sent = trio.current_time()
            if sent >= t.expires:
                t.lose(f"no keep-alive answered within the lease's {t.ttl} s")
                break
            try:
                with trio.fail_after(t.expires - sent):
                    ttl = await self.client.lease_keepalive(t.lease, timeout=t.expires - sent)
            except LeaseNotFound:
                t.lose("the lease expired")
                break
            except (EtcdError, trio.TooSlowError) as e:
                if not failing:  # once per outage; the lease's end is logged below
                    log.warning("keep-alive of lease %x: %s; retrying", t.lease, e)
                    failing = True
                next_send = trio.current_time() + min(0.2, interval)
                continue
            if failing:
                log.info("keep-alive of lease %x answered again", t.lease)
                failing = False
            t.expires = sent + ttl  # etcd renewed after it got the request, so later
            next_send = sent + interval
        if t.token and t.lost != "resigned":
            log.warning("%s no longer leads %s: %s", self.member_id, self.key, t.lost)
        self._nursery.start_soon(self._revoke, t.lease)  # whatever is left of it

    async def _watch_key(self, t: Term) -> None:
        """End term t when its leader key is deleted or re-created by someone else;
        stop when the term ends otherwise."""
        rev = t.token + 1

        async def watch() -> None:
            nonlocal rev
            while t.lost is None:
                try:
                    async with self.client.watch(self.key, start_revision=rev) as w:
                        async for ev in w:
                            rev = ev.revision + 1
                            if ev.type == "DELETE":
                                t.lose("the leader key was deleted")
                            elif ev.kv.create_revision != t.token:
                                t.lose(f"the leader key was taken: {Leader.from_kv(ev.kv)}")
                except WatchCompacted:
                    try:
                        r = await self.client.get(self.key)
                    except EtcdError as e:
                        log.debug("read of %s: %s", self.key, e)
                        await trio.sleep(0.2)
                        continue
                    if r.kv is None or r.kv.create_revision != t.token:
                        t.lose("the leader key was deleted")
                    rev = r.revision + 1
                except EtcdError as e:  # the lease's own count decides; keep watching
                    log.debug("watch of %s: %s", self.key, e)
                    await trio.sleep(0.2)

        await _until_lost(t, watch)

    async def _revoke(self, lease: int) -> None:
        with trio.move_on_after(self.client.timeout):
            try:
                await self.client.lease_revoke(lease)
            except EtcdError as e:
                log.debug("revoke lease %x: %s", lease, e)

    async def resign(self) -> None:
        """Step down: end our term, delete the leader key if it is still ours, and
        revoke its lease. Nothing to do if we do not lead; never raises EtcdError
        (a lease etcd did not hear the end of expires by itself)."""
        t, self.term = self.term, None
        if t is None or t.lost is not None:
            return
        t.lose("resigned")
        try:
            await self.client.txn([Compare(self.key, "lease", "==", t.lease)],
                                  [OpDelete(self.key)])
            await self.client.lease_revoke(t.lease)
        except LeaseNotFound:
            pass
        except EtcdError as e:
            log.warning("resign from %s: %s (its lease expires in %d s)", self.key, e, t.ttl)

    @asynccontextmanager
    async def lead(self) -> AsyncIterator[Term]:
        """``async with e.lead() as term:`` campaign, then run the body as leader.

        The body is cancelled as soon as the term ends, and the block then raises
        LeadershipLost; when the body ends first, we resign."""
        term = await self.campaign()
        done = False
        async with trio.open_nursery() as n:
            async def cancel_when_lost() -> None:
                await term.wait_lost()
                n.cancel_scope.cancel()
            n.start_soon(cancel_when_lost)
            try:
                yield term
                done = True
            finally:
                n.cancel_scope.cancel()
                if term.lost is None:
                    with trio.CancelScope(shield=True), trio.move_on_after(self.client.timeout):
                        await self.resign()
        if not done and term.lost is not None and term.lost != "resigned":
            raise LeadershipLost(f"term {term.token} ended: {term.lost}")

    # ------------------------------------------------------------ fencing

    async def guarded_put(self, key: bytes | str, value: bytes | str, token: int, *,
                          lease: int = 0) -> int:
        """Write key = value (attached to lease, if given) only while the term named
        token leads: one txn that compares the leader key's create_revision with token.
        Returns the write's revision. Raises LeadershipLost (naming the leader now) when
        it is refused, and ends our term if token is ours; EtcdError when etcd fails it."""
        return await self._guarded(OpPut(key, value, lease), token)

    async def guarded_delete(self, key: bytes | str, token: int) -> int:
        """Delete key only while the term named token leads (as guarded_put)."""
        return await self._guarded(OpDelete(key), token)

    async def _guarded(self, op: Op, token: int) -> int:
        t = self.term
        if t is not None and t.token == token and t.lost is not None:
            raise LeadershipLost(f"term {token} ended: {t.lost}")
        r = await self.client.txn([Compare(self.key, "create_revision", "==", token)],
                                  [op], [OpGet(self.key)])
        if r.succeeded:
            return r.revision
        kv = _range_kv(r)
        now = f"{Leader.from_kv(kv)} leads" if kv else "no one leads"
        reason = f"write refused: token {token} is stale, {now}"
        if t is not None and t.token == token:
            t.lose(reason)
        raise LeadershipLost(reason)


async def _until_lost(t: Term, fn: Callable[[], Awaitable[None]]) -> None:
    """Run fn until it returns or term t ends, whichever comes first."""
    async with trio.open_nursery() as n:
        async def stop() -> None:
            await t.wait_lost()
            n.cancel_scope.cancel()
        n.start_soon(stop)
        await fn()
        n.cancel_scope.cancel()


def _range_kv(r: TxnResponse) -> KeyValue | None:
    """The key a txn's failure branch read (its one OpGet), or None."""
    first = r.responses[0] if r.responses else None
    return first.kv if isinstance(first, RangeResponse) else None


@asynccontextmanager
async def open_election(client: EtcdClient, prefix: str, *, member_id: str, address: str,
                        ttl: int = DEFAULT_TTL) -> AsyncIterator[Election]:
    """``async with open_election(etcd, "/virtfs/g1", member_id=..., address=...) as e:``
    an Election on PREFIX/leader whose leases last ttl seconds. On exit it resigns
    and revokes its leases (bounded by the client's timeout)."""
    if ttl < 2:
        raise ValueError("election TTL must be >= 2 s (etcd's minimum lease)")
    async with trio.open_nursery() as n:
        e = Election(client, prefix, member_id, address, ttl, n)
        try:
            yield e
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(client.timeout):
                await e.resign()
                for t in (e._lease, e.term):
                    if t is not None:
                        t.lose("closed")
                        await e._revoke(t.lease)
            n.cancel_scope.cancel()
