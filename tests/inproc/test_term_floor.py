"""Agents check the leader's term in replies and pushes (docs/ha.md "Agents check the
term"): the server stamps them, the client refuses an older term's, and the agent's
session reconnects and retries as after not_leader. In-process, under trio."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from controller import codec
from controller import protocol as P
from controller.client import Client, ConnectionLost, TermFloor
from controller.server import Connection, Server
from controller.transport import FrameReader
from virtfs.agent import Session


def test_the_floor_admits_its_own_term_and_newer_and_no_term() -> None:
    f = TermFloor()
    assert f.admit(None) and f.admit(0) and f.highest == 0
    assert f.admit(7) and f.highest == 7
    assert f.admit(7) and f.admit(9) and f.highest == 9
    assert not f.admit(8)  # a deposed leader's
    assert f.admit(None) and f.admit(0)  # a standalone controller, a standby's answer
    for bad in (True, -1, "9", 9.0):
        assert not f.admit(bad)
    assert f.highest == 9 and f.refused == 5


async def _answer(stream: trio.abc.Stream, msgs: list[dict[str, Any]]) -> None:
    for m in msgs:
        await stream.send_all(codec.wire_frame(m))


async def test_a_reply_of_an_older_term_is_refused_and_ends_the_link() -> None:
    floor = TermFloor()
    ours, theirs = trio.testing.memory_stream_pair()
    pushed: list[dict[str, Any]] = []

    async def on_push(msg: dict[str, Any]) -> None:
        pushed.append(msg)

    client = Client(ours, on_push, floor)
    async with trio.open_nursery() as n:
        await n.start(client._reader)
        n.start_soon(_answer, theirs, [{"id": 1, "ok": True, "result": "a", "term": 7}])
        assert await client.call("status", timeout=5) == "a"
        assert floor.highest == 7
        n.start_soon(_answer, theirs, [{"push": "namespace", "term": 9},
                                       {"id": 2, "ok": True, "result": "b", "term": 8}])
        with pytest.raises(ConnectionLost, match="term 8, older than term 9 seen"):
            await client.call("status", timeout=5)
        assert [p["push"] for p in pushed] == ["namespace"]
        assert client.closed and floor.highest == 9
        n.cancel_scope.cancel()

    # the floor outlives the link: a push of term 8 on a new one is not acted on
    ours, theirs = trio.testing.memory_stream_pair()
    client = Client(ours, on_push, floor)
    async with trio.open_nursery() as n:
        await n.start(client._reader)
        await _answer(theirs, [{"push": "rename", "term": 8}])
        with trio.fail_after(5):
            await client.closed_event.wait()
        assert [p["push"] for p in pushed] == ["namespace"]
        n.cancel_scope.cancel()


async def test_without_a_floor_or_a_term_nothing_changes() -> None:
    for floor, term in ((None, 3), (TermFloor(), None)):
        ours, theirs = trio.testing.memory_stream_pair()
        client = Client(ours, None, floor)
        async with trio.open_nursery() as n:
            await n.start(client._reader)
            for rid in (1, 2):
                reply: dict[str, Any] = {"id": rid, "ok": True, "result": rid}
                if term is not None:
                    reply["term"] = term - rid  # lower each time: no floor, no check
                n.start_soon(_answer, theirs, [reply])
                assert await client.call("status", timeout=5) == rid
            n.cancel_scope.cancel()


async def _serve_one(server: Server) -> list[dict[str, Any]]:
    """hello, status and a push over one in-memory connection; the frames received."""
    ours, theirs = trio.testing.memory_stream_pair()
    conn = Connection(theirs, server.dispatch, server)
    got: list[dict[str, Any]] = []
    async with trio.open_nursery() as n:
        n.start_soon(conn.serve)
        reader = FrameReader(ours, 1 << 20)
        for rid, op, args in ((1, "hello", {"version": P.PROTOCOL_VERSION, "role": "admin"}),
                              (2, "status", {})):
            await ours.send_all(codec.wire_frame({"id": rid, "op": op, "args": args}))
            got.append(await reader.read())
        await conn.send({"push": "namespace"})
        got.append(await reader.read())
        n.cancel_scope.cancel()
    return got


async def test_a_leader_stamps_replies_and_pushes_with_its_term() -> None:
    async def dispatch(op: str, args: dict[str, Any], conn: Any) -> Any:
        return {"op": op}

    term = [9]
    leader = Server(dispatch, leader=lambda: (True, None), term=lambda: term[0])
    assert [m.get("term") for m in await _serve_one(leader)] == [9, 9, 9]
    alone = Server(dispatch)
    assert all("term" not in m for m in await _serve_one(alone))
    term[0] = 0  # a standby (or a member between terms): no stamp
    assert all("term" not in m for m in await _serve_one(leader))


async def test_the_agent_reconnects_and_retries_after_an_older_term(tmp_path: Path) -> None:
    """A fake controller answers hello and register in term 9 on each connection, and
    disk.open on the first one in term 5 (a deposed leader's late answer): the session
    leaves that link, registers again and gets disk.open's answer on the second."""
    path = str(tmp_path / "c.sock")
    served: list[tuple[int, str, int]] = []

    async def handle(stream: trio.SocketStream, n: int) -> None:
        reader = FrameReader(stream, 1 << 20)
        async with stream:
            while (msg := await reader.read()) is not None:
                op = msg["op"]
                result = {"hello": {"protocol": P.PROTOCOL_VERSION},
                          "agent.register": {"agent_id": n, "lease": 10.0},
                          "agent.heartbeat": {}}.get(op, {"conn": n})
                term = 5 if (n == 1 and op == "disk.open") else 9
                served.append((n, op, term))
                try:
                    await stream.send_all(codec.wire_frame(
                        {"id": msg["id"], "ok": True, "result": result, "term": term}))
                except trio.BrokenResourceError:
                    return

    async def fake_controller(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(path)
        sock.listen()
        listener = trio.SocketListener(sock)
        task_status.started()
        async with trio.open_nursery() as n, listener:
            k = 0
            while True:
                stream = await listener.accept()
                k += 1
                n.start_soon(handle, stream, k)

    session = Session(f"unix:{path}", str(tmp_path / "mnt"), call_timeout=10.0)
    async with trio.open_nursery() as n:
        await n.start(fake_controller)
        await n.start(session.run)
        with trio.fail_after(10):
            assert await session.call("disk.open", name="d") == {"conn": 2}
        assert (1, "disk.open", 5) in served and (2, "agent.register", 9) in served
        assert session.terms.highest == 9 and session.terms.refused == 1
        assert session.reconnects == 2
        n.cancel_scope.cancel()
