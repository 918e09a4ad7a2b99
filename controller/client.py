"""open_controller(addr): a multiplexed client used by the agent and vdctl."""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from . import codec
from . import protocol as P
from .server import FrameError, FrameReader, parse_addr

DEFAULT_TIMEOUT = 30.0


class ConnectionLost(P.RemoteError):
    def __init__(self, message: str):
        super().__init__("connection_lost", message)


class Client:
    def __init__(self, stream: trio.abc.Stream, on_push: Callable[[dict[str, Any]], Any] | None):
        self.stream = stream
        self.on_push = on_push
        self._next_id = 1
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._send_lock = trio.Lock()
        self.closed = False
        self.close_reason = ""
        self.closed_event = trio.Event()  # set with closed: lets a holder notice at once

    async def _reader(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        reader = FrameReader(self.stream, codec.MAX_RESPONSE_FRAME)
        task_status.started()
        try:
            while True:
                msg = await reader.read()
                if msg is None:
                    self.close_reason = "the controller closed the connection"
                    break
                if not isinstance(msg, dict):
                    continue
                if "push" in msg:
                    if self.on_push is not None:
                        await self.on_push(msg)
                    continue
                rid = msg.get("id")
                chan = self._waiting.pop(rid, None) if isinstance(rid, int) else None
                if chan is not None:
                    chan.send_nowait(msg)
                elif not msg.get("ok", True):
                    err = msg.get("error") or {}
                    self.close_reason = str(err.get("message", "protocol error"))
        except (FrameError, codec.CodecError, trio.BrokenResourceError,
                trio.ClosedResourceError) as e:
            self.close_reason = str(e) or e.__class__.__name__
        finally:
            self.closed = True
            self.closed_event.set()
            for chan in self._waiting.values():
                chan.close()
            self._waiting.clear()

    async def call(self, op: str, timeout: float | None = DEFAULT_TIMEOUT, **args: Any) -> Any:
        """One request/reply; RemoteError on an error reply, ConnectionLost if cut."""
        if self.closed:
            raise ConnectionLost(self.close_reason or "not connected")
        rid = self._next_id
        self._next_id += 1
        try:
            frame = codec.wire_frame({"id": rid, "op": op, "args": args})
        except (TypeError, ValueError, OverflowError) as e:
            raise P.invalid(f"{op}: arguments cannot be encoded: {e}") from None
        send, recv = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[rid] = send
        with trio.fail_after(timeout if timeout is not None else math.inf):
            try:
                async with self._send_lock:
                    await self.stream.send_all(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                self._waiting.pop(rid, None)
                raise ConnectionLost(f"cannot send to the controller: {e}") from None
            try:
                msg = await recv.receive()
            except trio.EndOfChannel:
                raise ConnectionLost(self.close_reason or "connection lost") from None
            finally:
                self._waiting.pop(rid, None)
        if msg.get("ok"):
            return msg.get("result")
        err = msg.get("error") or {}
        raise P.RemoteError(str(err.get("code", P.E_INTERNAL)),
                            str(err.get("message", "unknown error")))


async def connect_stream(addr: str) -> trio.abc.Stream:
    kind, where = parse_addr(addr)
    if kind == "unix":
        return await trio.open_unix_socket(where)
    raise ValueError("tcp:// needs TLS and tokens, which this release does not have yet")


def single_leaf(eg: BaseExceptionGroup) -> BaseException | None:
    """The one real exception inside a (nested) group, ignoring cancellations."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for x in e.exceptions:
                walk(x)
        elif not isinstance(e, trio.Cancelled):
            leaves.append(e)

    walk(eg)
    return leaves[0] if len(leaves) == 1 else None


@asynccontextmanager
async def open_controller(addr: str, *, role: str = "admin", name: str = "",
                          on_push: Callable[[dict[str, Any]], Any] | None = None,
                          timeout: float = DEFAULT_TIMEOUT) -> AsyncIterator[Client]:
    try:
        with trio.fail_after(timeout):
            stream = await connect_stream(addr)
    except (OSError, trio.TooSlowError) as e:
        raise ConnectionLost(f"cannot connect to the controller at {addr}: "
                             f"{getattr(e, 'strerror', None) or e}") from None
    client = Client(stream, on_push)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client._reader)
            await client.call("hello", timeout=timeout, version=P.PROTOCOL_VERSION, role=role,
                              name=name or f"pid-{os.getpid()}")
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as eg:
        leaf = single_leaf(eg)
        if leaf is None:
            raise
        raise leaf from None
    finally:
        await stream.aclose()
