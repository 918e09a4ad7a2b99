"""Listeners and the per-connection loop: framing, hello, allow-list, errors.

A connection is closed (and only that connection) on a malformed or oversized
frame, a frame that does not arrive within ``FRAME_TIMEOUT``, a missing or
wrong hello, or a peer that is not the controller's own user (or root).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from . import codec
from . import protocol as P

log = logging.getLogger(__name__)

FRAME_TIMEOUT = 10.0  # once a frame has begun, all of it must arrive within this
HELLO_TIMEOUT = 10.0
MAX_INFLIGHT = 64  # concurrent requests per connection
UNLIMITED_OPS = frozenset({"agent.ack", "agent.heartbeat"})

Dispatch = Callable[[str, dict[str, Any], "Connection"], Awaitable[Any]]


class FrameError(Exception):
    pass


class FrameReader:
    """Reads length-prefixed frames from a trio stream with caps and deadlines."""

    def __init__(self, stream: trio.abc.ReceiveStream, max_size: int):
        self.stream = stream
        self.max_size = max_size
        self.buf = bytearray()

    async def _fill(self, n: int) -> bool:
        while len(self.buf) < n:
            chunk = await self.stream.receive_some(1 << 16)
            if not chunk:
                if self.buf:
                    raise FrameError("connection closed in the middle of a frame")
                return False
            self.buf += chunk
        return True

    async def read(self) -> Any | None:
        """The next decoded frame, or None at a clean end of stream."""
        if not await self._fill(1):
            return None
        with trio.move_on_after(FRAME_TIMEOUT) as scope:
            await self._fill(4)
            length = codec.wire_length(bytes(self.buf[:4]), max_size=self.max_size)
            await self._fill(4 + length)
        if scope.cancelled_caught:
            raise FrameError(f"frame not complete within {FRAME_TIMEOUT:.0f} s")
        payload = bytes(self.buf[4 : 4 + length])
        del self.buf[: 4 + length]
        return codec.unpack(payload, max_size=self.max_size)


def peer_uid(stream: trio.SocketStream) -> int | None:
    sock = stream.socket
    if sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class Connection:
    def __init__(self, stream: trio.SocketStream, dispatch: Dispatch, server: Server):
        self.stream = stream
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

    async def send(self, msg: dict[str, Any]) -> None:
        data = codec.wire_frame(msg)
        async with self.send_lock:
            if self.closed:
                return
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.closed = True

    async def reply_error(self, rid: Any, err: P.RemoteError) -> None:
        await self.send({"id": rid, "ok": False, "error": err.to_wire()})

    async def serve(self) -> None:
        reader = FrameReader(self.stream, codec.MAX_REQUEST_FRAME)
        limiter = trio.Semaphore(MAX_INFLIGHT)
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
                        continue
                    if msg["op"] in UNLIMITED_OPS:
                        # acks and heartbeats never block and must never wait behind
                        # requests that may themselves wait for this very ack
                        nursery.start_soon(self.handle, msg, None)
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
        await self.stream.aclose()

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
        self.role = role
        name = args.get("name")
        self.name = name if isinstance(name, str) else ""
        await self.send({"id": rid, "ok": True, "result": {
            "protocol": P.PROTOCOL_VERSION, "server": "virtfs-controller"}})

    async def handle(self, msg: dict[str, Any], limiter: trio.Semaphore | None) -> None:
        rid, op = msg["id"], msg["op"]
        try:
            spec = P.OPS.get(op)
            if spec is None:
                raise P.RemoteError(P.E_UNSUPPORTED, f"unknown operation {op!r}")
            if self.role not in spec[1]:
                raise P.RemoteError(P.E_UNAUTHORIZED, f"{op} is not allowed for {self.role}s")
            args = P.validate_args(op, msg.get("args"))
            result = await self.dispatch(op, args, self)
            await self.send({"id": rid, "ok": True, "result": result})
        except P.RemoteError as e:
            await self.reply_error(rid, e)
        except Exception as e:
            log.exception("internal error in %s", op)
            await self.reply_error(rid, P.RemoteError(P.E_INTERNAL, f"internal error: {e!r}"))
        finally:
            if limiter is not None:
                limiter.release()


class Server:
    def __init__(self, dispatch: Dispatch):
        self.dispatch = dispatch
        self.uid = os.getuid()
        self.connections = 0

    async def handle_stream(self, stream: trio.SocketStream) -> None:
        uid = peer_uid(stream)
        if uid is not None and uid not in (0, self.uid):
            log.warning("refused a connection from uid %d", uid)
            conn = Connection(stream, self.dispatch, self)
            await conn.reply_error(None, P.RemoteError(
                P.E_UNAUTHORIZED, f"uid {uid} may not use this controller"))
            await stream.aclose()
            return
        self.connections += 1
        try:
            await Connection(stream, self.dispatch, self).serve()
        finally:
            self.connections -= 1


def parse_addr(addr: str) -> tuple[str, str]:
    if addr.startswith("unix:"):
        path = addr[5:]
        if not path:
            raise ValueError(f"bad address {addr!r}: empty path")
        return "unix", path
    if addr.startswith("tcp://"):
        return "tcp", addr[6:]
    raise ValueError(f"bad address {addr!r}: use unix:PATH or tcp://HOST:PORT")


def bind_unix(path: str) -> trio.socket.SocketType:
    """A listening Unix socket born 0600 in a 0700 directory; a stale socket is replaced."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, mode=0o700, exist_ok=True)
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


async def serve_listeners(server: Server, addrs: list[str], *,
                          task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    listeners = []
    for addr in addrs:
        kind, where = parse_addr(addr)
        if kind == "tcp":
            raise ValueError("tcp:// listeners need TLS and tokens, which this release does "
                             "not have yet; use unix:PATH")
        listeners.append(trio.SocketListener(bind_unix(where)))
    await trio.serve_listeners(server.handle_stream, listeners,  # type: ignore[arg-type]
                               task_status=task_status)
