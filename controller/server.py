"""Listeners and the per-connection loop: framing, hello, allow-list, errors.

Two kinds of listener (docs/security.md):

- ``unix:PATH``: the peer must be the controller's own user or root
  (``SO_PEERCRED``); no token.
- ``tcp://HOST:PORT``: TLS 1.3 only (client certificates verified against a CA
  when one is configured), and the shared token in ``hello``, compared in
  constant time. A TCP listener without TLS and a token is never started.

A connection is closed (and only that connection) on a malformed or oversized
frame, a frame that does not arrive within ``transport.FRAME_TIMEOUT``, a missing or
wrong hello or token, a TLS handshake that fails or takes longer than
``HANDSHAKE_TIMEOUT``, a peer that does not read its replies for
``SEND_TIMEOUT``, or a peer that is not the controller's own user (or root).
At most ``max_connections`` connections are open at once (more are closed at
accept), each with at most ``MAX_INFLIGHT`` requests in flight.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from . import codec
from . import protocol as P
from .transport import (
    FrameError,
    FrameReader,
    ServerSecurity,
    format_tcp,
    parse_addr,
    split_host_port,
    token_matches,
)

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 10.0
MAX_INFLIGHT = 64  # concurrent requests per connection
# acks and heartbeats bypass MAX_INFLIGHT; a peer with more than this many of them
# unanswered (it does not read its replies) is cut off rather than queued without end
MAX_UNLIMITED_INFLIGHT = 1024
MAX_CONNECTIONS = 512  # open connections per controller (Server.max_connections)
HELLO_MAX_FRAME = 16 << 10  # frames before a valid hello: an unauthenticated peer's cap
HANDSHAKE_TIMEOUT = 10.0  # a TLS handshake must complete within this
SEND_TIMEOUT = 60.0  # a reply or push not taken by the peer within this closes it
CLOSE_TIMEOUT = 2.0  # TLS close_notify: then the socket is closed regardless
UNLIMITED_OPS = frozenset({"agent.ack", "agent.heartbeat"})

Dispatch = Callable[[str, dict[str, Any], "Connection"], Awaitable[Any]]


def peer_uid(stream: trio.SocketStream) -> int | None:
    sock = stream.socket
    if sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class Connection:
    def __init__(self, stream: trio.abc.Stream, dispatch: Dispatch, server: Server, *,
                 token: bytes | None = None, peer: str = ""):
        self.stream = stream
        self.token = token  # None: no token needed (a Unix socket)
        self.peer = peer  # for log lines: "uid 0" or "tcp 10.0.0.2:41234"
        self.dispatch = dispatch
        self.server = server
        self.role: str | None = None
        self.name = ""
        self.send_lock = trio.Lock()
        self.closed = False
        self.agent: Any = None  # set by agent.register
        self.on_close: list[Callable[[], None]] = []
        self._scope: trio.CancelScope | None = None

    def abort(self) -> None:
        """Close this connection from the server side (the peer must reconnect)."""
        self.closed = True
        if self._scope is not None:
            self._scope.cancel()

    async def send(self, msg: dict[str, Any], term: int | None = None) -> None:
        """Send one reply or push. A group's leader stamps it with its term token
        (``"term"``: term, or the term it serves in now when None; none while it does not
        lead, nor at a controller that runs alone), so agents refuse an older term's
        (controller/client.py TermFloor, docs/ha.md)."""
        t = self.server.term_now() if term is None else term
        if t:
            msg = {**msg, "term": t}
        data = codec.wire_frame(msg)
        async with self.send_lock:
            if self.closed:
                return
            try:
                with trio.move_on_after(SEND_TIMEOUT) as scope:
                    await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.closed = True
                return
            if scope.cancelled_caught:
                # half a frame may have gone out: the stream is unusable now
                log.info("closing the connection of %s: it took no data for %.0f s",
                         self.peer or "a peer", SEND_TIMEOUT)
                self.abort()

    async def reply_error(self, rid: Any, err: P.RemoteError, term: int | None = None) -> None:
        await self.send({"id": rid, "ok": False, "error": err.to_wire()}, term)

    async def serve(self) -> None:
        reader = FrameReader(self.stream, HELLO_MAX_FRAME)  # raised after the hello
        limiter = trio.Semaphore(MAX_INFLIGHT)
        unlimited = trio.Semaphore(MAX_UNLIMITED_INFLIGHT)
        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
            try:
                while True:
                    timeout = HELLO_TIMEOUT if self.role is None else float("inf")
                    with trio.move_on_after(timeout) as scope:
                        msg = await reader.read()
                    if scope.cancelled_caught:
                        raise FrameError("no hello within the deadline")
                    if msg is None:
                        break
                    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str) or (
                        not isinstance(msg.get("id"), int) or isinstance(msg.get("id"), bool)
                    ):
                        raise FrameError("a request must be a map with an int id and a str op")
                    if self.role is None:
                        await self.hello(msg)
                        reader.max_size = codec.MAX_REQUEST_FRAME
                        continue
                    if msg["op"] in UNLIMITED_OPS:
                        # acks and heartbeats never block and must never wait behind
                        # requests that may themselves wait for this very ack
                        try:
                            unlimited.acquire_nowait()
                        except trio.WouldBlock:
                            raise FrameError(f"more than {MAX_UNLIMITED_INFLIGHT} acks and "
                                             "heartbeats unanswered") from None
                        nursery.start_soon(self.handle, msg, unlimited)
                        continue
                    await limiter.acquire()
                    nursery.start_soon(self.handle, msg, limiter)
            except (FrameError, codec.CodecError) as e:
                log.info("closing connection: %s", e)
                await self.reply_error(None, P.RemoteError(P.E_PROTOCOL, str(e)))
                nursery.cancel_scope.cancel()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                nursery.cancel_scope.cancel()
        self.closed = True
        for cb in self.on_close:
            cb()
        await close_stream(self.stream)

    async def hello(self, msg: dict[str, Any]) -> None:
        rid = msg["id"]
        args = msg.get("args")
        if msg["op"] != "hello" or not isinstance(args, dict):
            raise FrameError("the first request must be hello")
        version, role = args.get("version"), args.get("role")
        if version != P.PROTOCOL_VERSION:
            await self.reply_error(rid, P.RemoteError(
                P.E_PROTOCOL, f"protocol version {version!r} is not supported "
                f"(this controller speaks {P.PROTOCOL_VERSION})"))
            raise FrameError("protocol version mismatch")
        if role not in ("admin", "agent"):
            raise FrameError(f"unknown role {role!r}")
        if self.token is not None and not token_matches(args.get("token"), self.token):
            # never say which: a wrong token and a missing one get the same answer
            log.warning("refused %s: wrong or missing token", self.peer or "a peer")
            await self.reply_error(rid, P.RemoteError(
                P.E_UNAUTHORIZED, "authentication failed: wrong or missing token"))
            raise FrameError("authentication failed")
        follower = self.server.not_leader()
        if follower is not None:
            await self.reply_error(rid, follower)
            raise FrameError(f"{follower.message} (told {self.peer or 'a peer'})")
        self.role = role
        name = args.get("name")
        self.name = name if isinstance(name, str) else ""
        await self.send({"id": rid, "ok": True, "result": {
            "protocol": P.PROTOCOL_VERSION, "server": "virtfs-controller"}})

    async def handle(self, msg: dict[str, Any], limiter: trio.Semaphore | None) -> None:
        rid, op = msg["id"], msg["op"]
        term = self.server.term_now()  # the reply carries the term it was served in
        try:
            spec = P.OPS.get(op)
            if spec is None:
                raise P.RemoteError(P.E_UNSUPPORTED, f"unknown operation {op!r}")
            if self.role not in spec[1]:
                raise P.RemoteError(P.E_UNAUTHORIZED, f"{op} is not allowed for {self.role}s")
            args = P.validate_args(op, msg.get("args"))
            result = await self.dispatch(op, args, self)
            await self.send({"id": rid, "ok": True, "result": result}, term)
        except P.RemoteError as e:
            await self.reply_error(rid, e, term)
        except Exception as e:
            log.exception("internal error in %s", op)
            await self.reply_error(rid, P.RemoteError(P.E_INTERNAL, f"internal error: {e!r}"),
                                   term)
        finally:
            if limiter is not None:
                limiter.release()


async def close_stream(stream: trio.abc.Stream) -> None:
    """Close stream (a TLS one with a close_notify) without waiting on the peer long."""
    with trio.move_on_after(CLOSE_TIMEOUT):
        try:
            await stream.aclose()
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    await trio.aclose_forcefully(stream)


def _tcp_peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "tcp ?"
    return f"tcp {host}:{port}"


class Server:
    """Accepts connections on every listener and serves each with a Connection.

    security: what TCP connections must present (None: TCP connections are
    refused; serve_listeners never opens a TCP listener without it).
    max_connections: connections open at once; more are closed at accept.
    leader: for a controller of a group, () -> (whether it leads now, the leader's
    client address or None); hello at a controller that does not lead is answered
    E_NOT_LEADER naming the leader, and the connection closed (docs/ha.md). None: it
    runs alone and always serves.
    term: for a controller of a group, () -> the token of the term it leads in now (0
    while it does not lead): every reply and push carries it as ``"term"`` (a reply,
    the term its request was taken in). None: no term is sent (it runs alone).
    """

    def __init__(self, dispatch: Dispatch, *, security: ServerSecurity | None = None,
                 max_connections: int = MAX_CONNECTIONS,
                 leader: Callable[[], tuple[bool, str | None]] | None = None,
                 term: Callable[[], int] | None = None):
        self.dispatch = dispatch
        self.leader = leader
        self.term = term
        self.open: set[Connection] = set()  # connections being served
        self.security = security
        self.max_connections = max_connections
        self.uid = os.getuid()
        self.connections = 0
        self.refused = 0  # connections closed at accept because of the cap
        self._refusal_logged = -1e9

    def abort_all(self) -> int:
        """Close every connection from our side (a deposed leader's: its peers must go
        to the new leader, and nothing it said later may reach them). Returns how many."""
        conns = list(self.open)
        for c in conns:
            c.abort()
        return len(conns)

    def term_now(self) -> int:
        """The term token replies and pushes carry now; 0: none."""
        return self.term() if self.term is not None else 0

    def not_leader(self) -> P.RemoteError | None:
        """None if this controller serves (it runs alone, or leads its group); else the
        E_NOT_LEADER error hello answers, naming the leader's address if known."""
        if self.leader is None:
            return None
        leads, where = self.leader()
        return None if leads else P.not_leader(where)

    async def handle_stream(self, stream: trio.SocketStream) -> None:
        if self.connections >= self.max_connections:
            self.refused += 1
            now = time.monotonic()
            if now - self._refusal_logged > 10:  # a flood must not flood the log
                self._refusal_logged = now
                log.warning("refusing connections: %d open, the cap (%d refused so far)",
                            self.connections, self.refused)
            await trio.aclose_forcefully(stream)
            return
        self.connections += 1
        try:
            if stream.socket.family == socket.AF_UNIX:
                await self._serve_unix(stream)
            else:
                await self._serve_tcp(stream)
        finally:
            self.connections -= 1

    async def _serve_unix(self, stream: trio.SocketStream) -> None:
        uid = peer_uid(stream)
        if uid is not None and uid not in (0, self.uid):
            log.warning("refused a connection from uid %d", uid)
            conn = Connection(stream, self.dispatch, self)
            await conn.reply_error(None, P.RemoteError(
                P.E_UNAUTHORIZED, f"uid {uid} may not use this controller"))
            await stream.aclose()
            return
        await self._serve(Connection(stream, self.dispatch, self, peer=f"uid {uid}"))

    async def _serve(self, conn: Connection) -> None:
        self.open.add(conn)
        try:
            await conn.serve()
        finally:
            self.open.discard(conn)

    async def _serve_tcp(self, stream: trio.SocketStream) -> None:
        peer = _tcp_peer(stream)
        if self.security is None:  # serve_listeners never lets this happen
            await trio.aclose_forcefully(stream)
            return
        tls = trio.SSLStream(stream, self.security.context, server_side=True)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await tls.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError) as e:
            why: object = e.__cause__ or e
            if isinstance(e, trio.TooSlowError):
                why = f"not complete within {HANDSHAKE_TIMEOUT:.0f} s"
            log.info("TLS handshake with %s failed: %s", peer, why)
            await trio.aclose_forcefully(tls)
            return
        await self._serve(Connection(tls, self.dispatch, self, token=self.security.token,
                                     peer=peer))


def bind_unix(path: str) -> trio.socket.SocketType:
    """A listening Unix socket born 0600; a stale socket is replaced.

    Its directory must exist (OSError otherwise): a typo in --listen must not create
    directories (the default socket's, the state dir, is made 0700 by the daemon).
    """
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise OSError(f"cannot listen on unix:{path}: no directory {d}")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except FileNotFoundError:
        pass
    except ConnectionRefusedError:
        os.unlink(path)  # a dead controller's socket
    else:
        raise OSError(f"another controller is listening on {path}")
    finally:
        probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(128)
    return trio.socket.from_stdlib_socket(sock)


TCP_NEEDS = ("tcp:// listeners need TLS and a token: give --tls-cert, --tls-key and "
             "--token-file (docs/security.md)")


async def serve_listeners(server: Server, addrs: list[str], *,
                          task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on every address and serve connections until cancelled.

    A tcp:// address needs server.security (ValueError otherwise, before anything
    listens). Each address actually bound is logged (a port 0 becomes the real one).
    """
    if server.security is None and any(parse_addr(a)[0] == "tcp" for a in addrs):
        raise ValueError(TCP_NEEDS)
    listeners: list[trio.SocketListener] = []
    for addr in addrs:
        kind, where = parse_addr(addr)
        if kind == "tcp":
            host, port = split_host_port(where)
            tcp = await trio.open_tcp_listeners(port, host=host)
            assert server.security is not None
            for lst in tcp:
                log.info("listening on %s (TLS 1.3, %s, token)",
                         format_tcp(lst.socket.getsockname()),
                         "client certificates required" if server.security.client_certs
                         else "no client certificates")
            listeners += tcp
        else:
            listeners.append(trio.SocketListener(bind_unix(where)))
            log.info("listening on unix:%s", where)
    await trio.serve_listeners(server.handle_stream, listeners,  # type: ignore[arg-type]
                               task_status=task_status)
