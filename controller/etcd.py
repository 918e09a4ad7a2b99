"""open_etcd(endpoints): a small etcd v3 client over its JSON gateway, for trio.

etcd is the controller group's engine (issue 14, docs/ha.md): it holds the election,
the members and the journal's durable head, and nothing bigger. We reach it through
the JSON gateway every etcd member serves on its client URL (``POST /v3/kv/range``,
``/v3/kv/txn``, ``/v3/lease/grant``, ``/v3/watch``, ...) with httpx, which runs on trio
through anyio; no gRPC stack. The message shapes are in controller/etcdwire.py.

Several endpoints (members of one cluster) may be given: a request goes to the one that
answered last, and on to the next when it cannot connect. A request that may already
have been sent is retried elsewhere only if it is a read (or otherwise harmless to
repeat); a write whose answer was lost raises EtcdUnavailable, as its outcome is unknown
(callers guard their writes with a txn, so a retry of theirs is safe).

Every call is bounded by the client's timeout (seconds; ``timeout=`` per call), so a
cluster without quorum, whose members hold a write until their own request timeout,
never wedges the caller. A watch (``watch()``) is a stream that reconnects by itself and
resumes from the revision after the last event it delivered.

etcd's own security (EtcdSecurity, docs/ha.md): https:// endpoints are verified against
a CA (the system's unless ``ca``), with a client certificate if the cluster asks for
one (``--client-cert-auth``); with a user, the client authenticates
(``/v3/auth/authenticate``) and sends the token etcd gives in the ``Authorization``
header of every request, authenticating again when etcd says the token is no longer
valid (it expires: ``--auth-token-ttl``, 300 s by default).
"""

from __future__ import annotations

import json
import logging
import math
import ssl
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from .etcdwire import (
    GRPC_UNAVAILABLE,
    Compare,
    DeleteResponse,
    EtcdError,
    EtcdRefused,
    EtcdUnavailable,
    Event,
    KeyValue,
    Lease,
    LeaseInfo,
    LeaseNotFound,
    Op,
    OpDelete,
    OpGet,
    OpPut,
    PutResponse,
    RangeResponse,
    TxnResponse,
    WatchCompacted,
    WatchResponse,
    error_of,
    prefix_end,
    put_body,
    range_body,
    refused,
    txn_body,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0  # s: above etcd's own request timeout for a member without quorum


@dataclass(frozen=True)
class EtcdSecurity:
    """How to reach a secured etcd (etcd's own TLS and authentication, not virtfs's).

    ca: PEM file of the CA that signed the members' certificates (None: the system's);
    cert, key: this client's certificate and key (PEM), for a cluster started with
    ``--client-cert-auth``; user, password: etcd's credentials (``etcdctl user add``),
    for a cluster with auth enabled. Build it with ``etcd_security``."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password: str | None = None

    def ssl_context(self) -> ssl.SSLContext:
        """The client TLS context. Raises ValueError (one line) for an unreadable or
        wrong PEM file."""
        try:
            ctx = ssl.create_default_context(cafile=self.ca)
            if self.cert:
                ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"etcd TLS: {getattr(e, 'strerror', None) or e} "
                             f"(--etcd-ca {self.ca}, --etcd-cert {self.cert}, "
                             f"--etcd-key {self.key})") from None
        return ctx


def etcd_security(*, ca: str | None = None, cert: str | None = None, key: str | None = None,
                  user: str | None = None, password_file: str | None = None
                  ) -> EtcdSecurity | None:
    """EtcdSecurity from command-line options (None if none is given). password_file:
    a file whose first line is the password (never a command-line argument, which other
    users see in ps). Raises ValueError (one line) for a missing pair or file."""
    if key and not cert:
        raise ValueError("--etcd-key needs --etcd-cert")
    if bool(user) != bool(password_file):
        raise ValueError("--etcd-user and --etcd-password-file go together")
    password = None
    if password_file:
        try:
            with open(password_file, encoding="utf-8") as f:
                password = f.readline().rstrip("\r\n")
        except OSError as e:
            raise ValueError(f"--etcd-password-file {password_file}: {e.strerror}") from None
        if not password:
            raise ValueError(f"--etcd-password-file {password_file}: empty")
    if not any((ca, cert, user)):
        return None
    return EtcdSecurity(ca, cert, key, user, password)


def parse_endpoints(endpoints: str | Sequence[str]) -> list[str]:
    """``"http://a:2379,http://b:2379"`` (or a list) -> the URLs, without a trailing
    slash. Raises ValueError naming a bad one (only http:// and https:// are spoken)."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out = [e.strip().rstrip("/") for e in items if e.strip()]
    if not out:
        raise ValueError("etcd: no endpoint given")
    for e in out:
        if not e.startswith(("http://", "https://")) or e[-3:] == "://":
            raise ValueError(f"etcd endpoint {e!r}: expected http://HOST:PORT or https://...")
    return out


class EtcdClient:
    """The client; make one with ``open_etcd``. Keys and values are bytes (str is
    UTF-8). Every method raises EtcdUnavailable or EtcdRefused (both EtcdError)."""

    def __init__(self, endpoints: list[str], http: httpx.AsyncClient, timeout: float,
                 credentials: tuple[str, str] | None = None) -> None:
        self.endpoints = endpoints
        self.timeout = timeout
        self._http = http
        self._current = 0
        self._credentials = credentials  # (user, password) for etcd's auth
        self._auth_token: str | None = None
        self._auth_lock = trio.Lock()

    @property
    def headers(self) -> dict[str, str]:
        """What every request carries: etcd's auth token, once we have one."""
        return {"Authorization": self._auth_token} if self._auth_token else {}

    async def _authenticate(self, stale: str | None) -> None:
        """Get a new auth token (unless another task already replaced stale)."""
        assert self._credentials is not None
        async with self._auth_lock:
            if self._auth_token is not None and self._auth_token != stale:
                return
            user, password = self._credentials
            self._auth_token = None
            answer = await self.call("/v3/auth/authenticate",
                                     {"name": user, "password": password}, _auth=False)
            token = answer.get("token")
            if not isinstance(token, str) or not token:
                raise EtcdError("etcd /v3/auth/authenticate: no token in the answer")
            self._auth_token = token

    @property
    def endpoint(self) -> str:
        """The endpoint the next request goes to first (the last one that answered)."""
        return self.endpoints[self._current]

    async def call(self, path: str, body: dict[str, Any], *, retry: bool = True,
                   timeout: float | None = None, _auth: bool = True) -> dict[str, Any]:
        """POST body to path (``/v3/kv/put``) and return the decoded answer.

        retry: the request is harmless to repeat, so it may go to the next endpoint
        even after it may have been sent (a read); without it, only a failure to
        connect moves it on. timeout: seconds for each endpoint's try. With
        credentials, a request is sent with the auth token, got first if need be, and
        sent once more with a new one if etcd says the token is not valid (etcd
        refused it before applying anything)."""
        if not _auth or self._credentials is None:
            return await self._call(path, body, retry=retry, timeout=timeout)
        if self._auth_token is None:
            await self._authenticate(None)
        token = self._auth_token
        try:
            return await self._call(path, body, retry=retry, timeout=timeout)
        except EtcdRefused as e:
            if not _token_invalid(e):
                raise
        await self._authenticate(token)
        return await self._call(path, body, retry=retry, timeout=timeout)

    async def _call(self, path: str, body: dict[str, Any], *, retry: bool,
                    timeout: float | None) -> dict[str, Any]:
        t = self.timeout if timeout is None else timeout
        errors: list[str] = []
        n = len(self.endpoints)
        for i in range(n):
            idx = (self._current + i) % n
            ep = self.endpoints[idx]
            try:
                with trio.fail_after(t):
                    resp = await self._http.post(ep + path, json=body, headers=self.headers)
                    raw = resp.content
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                errors.append(f"{ep}: {_why(e, t)}")
                continue
            except (httpx.TransportError, trio.TooSlowError) as e:
                if retry:
                    errors.append(f"{ep}: {_why(e, t)}")
                    continue
                raise EtcdUnavailable(f"etcd {ep}{path}: {_why(e, t)} (the request may have "
                                      "been applied)") from None
            answer = _http_error(f"{ep}{path}", resp.status_code, raw)
            if isinstance(answer, dict):
                self._current = idx
                return answer
            err = answer
            if isinstance(err, EtcdUnavailable) and retry:
                errors.append(str(err))
                continue
            self._current = idx
            raise err
        raise EtcdUnavailable("etcd: no endpoint answered: " + "; ".join(errors))

    # ------------------------------------------------------------ keys

    async def get(self, key: bytes | str, *, revision: int = 0) -> RangeResponse:
        """One key (``.kv`` is it, or None) at the latest revision or at revision."""
        return await self.range(key, revision=revision)

    async def get_prefix(self, prefix: bytes | str, *, limit: int = 0) -> RangeResponse:
        """Every key starting with prefix, sorted by key (at most limit when not 0)."""
        return await self.range(prefix, prefix=True, limit=limit)

    async def range(self, key: bytes | str, *, prefix: bool = False, limit: int = 0,
                    revision: int = 0, keys_only: bool = False) -> RangeResponse:
        """The general read (RangeRequest); linearizable, so it needs quorum."""
        body: dict[str, Any] = range_body(key, prefix)
        if limit:
            body["limit"] = str(limit)
        if revision:
            body["revision"] = str(revision)
        if keys_only:
            body["keys_only"] = True
        return RangeResponse.from_json(await self.call("/v3/kv/range", body))

    async def put(self, key: bytes | str, value: bytes | str, *, lease: int = 0,
                  prev_kv: bool = False) -> PutResponse:
        """Write key = value, attached to lease (0: none; the key goes with the lease).
        Raises LeaseNotFound for a lease that is gone."""
        body = put_body(key, value, lease, prev_kv)
        return PutResponse.from_json(await self.call("/v3/kv/put", body, retry=False))

    async def delete(self, key: bytes | str, *, prefix: bool = False,
                     prev_kv: bool = False) -> DeleteResponse:
        """Delete key, or every key under it with prefix=True; deleting nothing is no
        error (deleted is 0)."""
        body: dict[str, Any] = range_body(key, prefix)
        if prev_kv:
            body["prev_kv"] = True
        return DeleteResponse.from_json(await self.call("/v3/kv/deleterange", body,
                                                        retry=False))

    async def txn(self, compares: list[Compare], success: list[Op],
                  failure: list[Op] | None = None) -> TxnResponse:
        """If every compare holds, run success, else failure: atomically, at one
        revision. ``succeeded`` says which branch ran."""
        body = txn_body(compares, success, failure or [])
        return TxnResponse.from_json(await self.call("/v3/kv/txn", body, retry=False))

    async def compact(self, revision: int) -> None:
        """Drop the history before revision (watches from before it then fail)."""
        await self.call("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    # ------------------------------------------------------------ leases

    async def lease_grant(self, ttl: int) -> Lease:
        """A new lease of ttl seconds (etcd's minimum is enforced by etcd)."""
        if ttl <= 0:
            raise ValueError("lease TTL must be > 0 s")
        d = await self.call("/v3/lease/grant", {"TTL": str(ttl)}, retry=False)
        return Lease(int(d.get("ID") or 0), int(d.get("TTL") or 0))

    async def lease_keepalive(self, lease: int, *, timeout: float | None = None) -> int:
        """Renew the lease to its full TTL; returns that TTL in seconds. Raises
        LeaseNotFound when it has expired or was revoked (etcd answers TTL 0)."""
        d = await self.call("/v3/lease/keepalive", {"ID": str(lease)}, timeout=timeout)
        res = d.get("result") or {}
        ttl = int(res.get("TTL") or 0)
        if ttl <= 0:
            raise LeaseNotFound(f"etcd {self.endpoint}: lease {lease:x} not found (expired "
                                "or revoked)", 5)
        return ttl

    async def lease_revoke(self, lease: int, *, timeout: float | None = None) -> None:
        """End the lease now and delete its keys. Raises LeaseNotFound if it is gone."""
        await self.call("/v3/lease/revoke", {"ID": str(lease)}, timeout=timeout)

    async def lease_time_to_live(self, lease: int, *, keys: bool = False) -> LeaseInfo:
        """Seconds the lease has left (-1: gone), and its keys when keys=True."""
        d = await self.call("/v3/lease/timetolive", {"ID": str(lease), "keys": keys})
        return LeaseInfo.from_json(d)

    async def status(self) -> dict[str, Any]:
        """The answering member's status (leader, raft_term, version, db size)."""
        return await self.call("/v3/maintenance/status", {})

    # ------------------------------------------------------------ watch

    @asynccontextmanager
    async def watch(self, key: bytes | str, *, prefix: bool = False, start_revision: int = 0,
                    prev_kv: bool = False, idle_timeout: float | None = None,
                    reconnect_for: float = 60.0) -> AsyncIterator[Watch]:
        """``async with client.watch(key) as w: async for event in w:`` the changes to
        key (or every key under it) in revision order, from start_revision (0: from now).

        The stream survives a gateway reconnect (etcd restarted, member gone): it
        reconnects, to the next endpoint if need be, and resumes from the revision
        after the last event delivered; with idle_timeout (s), a stream that says
        nothing for that long is presumed dead and reconnected too. Raises
        EtcdUnavailable when no endpoint took it back within reconnect_for seconds,
        and WatchCompacted when the revision to resume from was compacted."""
        w = Watch(self, key, prefix=prefix, start_revision=start_revision, prev_kv=prev_kv,
                  idle_timeout=idle_timeout, reconnect_for=reconnect_for)
        try:
            yield w
        finally:
            await w.aclose()


class Watch:
    """One watch stream (made by EtcdClient.watch): an async iterator of Event.

    ``next_revision`` is where it would resume: the revision after the last event it
    delivered (or after the revision it was created at, for a watch from now)."""

    def __init__(self, client: EtcdClient, key: bytes | str, *, prefix: bool,
                 start_revision: int, prev_kv: bool, idle_timeout: float | None,
                 reconnect_for: float) -> None:
        self._client = client
        self._key = key
        self._prefix = prefix
        self._prev_kv = prev_kv
        self._idle = idle_timeout
        self._reconnect_for = reconnect_for
        self.next_revision = start_revision
        self.reconnects = 0
        self._pending: deque[Event] = deque()
        self._resp: httpx.Response | None = None
        self._lines: AsyncIterator[str] | None = None
        self._closed = False

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> Event:
        while not self._pending:
            if self._closed:
                raise StopAsyncIteration
            await self._receive()
        ev = self._pending.popleft()
        # resume after an event once it is delivered (events of one revision arrive
        # in one message, so a resume never splits a transaction)
        self.next_revision = max(self.next_revision, ev.revision + 1)
        return ev

    async def aclose(self) -> None:
        """Close the stream; iteration ends."""
        self._closed = True
        await self._drop()

    async def _drop(self) -> None:
        resp, lines = self._resp, self._lines
        self._resp = self._lines = None
        if resp is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await resp.aclose()
            # httpx reads a stream through a chain of async generators; left suspended,
            # trio would finalize them in the GC with a ResourceWarning. Read on: on the
            # closed socket they raise, which ends each of them.
            for _ in range(100_000):
                if lines is None:
                    break
                try:
                    await lines.__anext__()
                except Exception:
                    break

    def _body(self) -> dict[str, Any]:
        req: dict[str, Any] = range_body(self._key, self._prefix)
        if self.next_revision:
            req["start_revision"] = str(self.next_revision)
        if self._prev_kv:
            req["prev_kv"] = True
        req["progress_notify"] = True
        return {"create_request": req}

    async def _connect(self) -> None:
        c = self._client
        give_up = trio.current_time() + self._reconnect_for
        delay = 0.05
        while True:
            ep = c.endpoint
            if c._credentials is not None and c._auth_token is None:
                await c._authenticate(None)
            token = c._auth_token
            try:
                with trio.fail_after(c.timeout):
                    req = c._http.build_request("POST", ep + "/v3/watch", json=self._body(),
                                                headers=c.headers)
                    resp = await c._http.send(req, stream=True)
                    if resp.status_code != 200:
                        raw = await resp.aread()
                        await resp.aclose()
            except (httpx.TransportError, trio.TooSlowError) as e:
                failure = f"{ep}: {_why(e, c.timeout)}"
            else:
                if resp.status_code == 200:
                    self._resp = resp
                    self._lines = resp.aiter_lines()
                    return
                answer = _http_error(ep + "/v3/watch", resp.status_code, raw)
                err = answer if isinstance(answer, EtcdError) else EtcdError(
                    f"etcd {ep}/v3/watch: HTTP {resp.status_code}")
                if isinstance(err, EtcdRefused) and _token_invalid(err) and (
                        c._credentials is not None):
                    await c._authenticate(token)  # expired: a new one, then again
                    continue
                if not isinstance(err, EtcdUnavailable):
                    raise err
                failure = str(err)
            c._current = (c._current + 1) % len(c.endpoints)
            if trio.current_time() + delay > give_up:
                raise EtcdUnavailable(f"etcd watch: no endpoint took it back within "
                                      f"{self._reconnect_for:g} s: {failure}")
            await trio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _receive(self) -> None:
        """Read one message of the stream into _pending (reconnecting when it broke)."""
        if self._lines is None:
            await self._connect()
        assert self._lines is not None
        try:
            with trio.fail_after(self._idle if self._idle else math.inf):
                line = await self._lines.__anext__()
        except (StopAsyncIteration, httpx.TransportError, trio.TooSlowError) as e:
            log.debug("etcd watch from %s broke (%s); resuming at revision %d",
                      self._client.endpoint, _why(e, self._idle or 0), self.next_revision)
            await self._drop()
            self._client._current = (self._client._current + 1) % len(self._client.endpoints)
            self.reconnects += 1
            return
        if not line.strip():
            return
        try:
            msg = json.loads(line)
        except ValueError:
            raise EtcdError(f"etcd watch: not JSON: {line[:80]!r}") from None
        err = error_of(self._client.endpoint + "/v3/watch", msg)
        if isinstance(err, EtcdUnavailable):  # the member lost its leader: elsewhere
            log.debug("%s; resuming at revision %d", err, self.next_revision)
            await self._drop()
            self.reconnects += 1
            return
        if err is not None:
            raise err
        self._take(WatchResponse.from_json(msg.get("result") or {}))

    def _take(self, res: WatchResponse) -> None:
        if res.canceled:
            if res.compact_revision:
                raise WatchCompacted(f"etcd watch of {self._key!r}: revision "
                                     f"{self.next_revision} is compacted (oldest kept: "
                                     f"{res.compact_revision}); re-read the current state",
                                     res.compact_revision)
            raise EtcdRefused(f"etcd watch of {self._key!r} canceled: "
                              f"{res.cancel_reason or 'no reason given'}")
        if res.events:
            self._pending.extend(res.events)
        elif res.created:
            if not self.next_revision:  # a watch from now starts after this revision
                self.next_revision = res.revision + 1
        elif res.revision:  # a progress notice: nothing more up to its revision
            self.next_revision = max(self.next_revision, res.revision + 1)


def _http_error(where: str, status: int, raw: bytes) -> EtcdError | dict[str, Any]:
    """A gateway answer: its decoded JSON object when it is a success, else the error
    it carries (an HTTP 5xx without one is taken as unavailable)."""
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return EtcdError(f"etcd {where}: HTTP {status}, not a JSON object: {raw[:80]!r}")
    err = error_of(where, data)
    if err is None and status != 200:
        err = refused(where, GRPC_UNAVAILABLE if status >= 500 else 0, f"HTTP {status}")
    return data if err is None else err


def _token_invalid(e: EtcdRefused) -> bool:
    """etcd refused a request for its auth token (expired, or from before a restart)."""
    text = str(e)
    return "invalid auth token" in text or "token is invalid" in text or (
        "user name is empty" in text)


def _why(e: BaseException, timeout: float = 0) -> str:
    if isinstance(e, trio.TooSlowError | httpx.TimeoutException):
        return f"no answer within {timeout:g} s" if timeout else "timed out"
    if isinstance(e, StopAsyncIteration):
        return "stream ended"
    cause: BaseException | None = e
    while cause is not None:  # a TLS failure says what is wrong (an untrusted certificate)
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS: {cause.verify_message or cause}"
        if isinstance(cause, ssl.SSLError):
            return f"TLS: {cause.reason or cause}"
        cause = cause.__cause__ or cause.__context__
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


@asynccontextmanager
async def open_etcd(endpoints: str | Sequence[str], *, timeout: float = DEFAULT_TIMEOUT,
                    security: EtcdSecurity | None = None) -> AsyncIterator[EtcdClient]:
    """``async with open_etcd("http://127.0.0.1:2379") as etcd:`` a client of the
    cluster whose client URLs endpoints lists (comma-separated). timeout: seconds for
    each request at each endpoint. security: etcd's TLS and credentials (EtcdSecurity).
    Raises ValueError for a malformed endpoint or TLS file; connects lazily, so an
    unreachable cluster (or a wrong password) shows on the first request."""
    eps = parse_endpoints(endpoints)
    verify: ssl.SSLContext | bool = True
    if security is not None:
        verify = security.ssl_context()
    creds = None
    if security is not None and security.user and security.password is not None:
        creds = (security.user, security.password)
    # no proxies from the environment: members are reached directly
    async with httpx.AsyncClient(trust_env=False, timeout=None, verify=verify) as http:
        yield EtcdClient(eps, http, timeout, creds)


# the client and, for its callers, the shapes it speaks (controller/etcdwire.py)
__all__ = ["Compare", "DeleteResponse", "EtcdClient", "EtcdError", "EtcdRefused",
           "EtcdSecurity", "etcd_security",
           "EtcdUnavailable", "Event", "KeyValue", "Lease", "LeaseInfo", "LeaseNotFound",
           "Op", "OpDelete", "OpGet", "OpPut", "PutResponse", "RangeResponse", "TxnResponse",
           "Watch", "WatchCompacted", "open_etcd", "parse_endpoints", "prefix_end"]
