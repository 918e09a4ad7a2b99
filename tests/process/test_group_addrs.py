"""Clients of a controller group (docs/ha.md): --controller takes the group's addresses
separated by commas; an address that does not answer is skipped, and a controller
that does not lead answers hello with "not the leader; the leader is X", where the
client goes next. The standbys here are real servers (controller/server.py) whose
leadership hook says they do not lead; the leader is a real controller process.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
from rig import BIN, ControllerProc, run_vdctl

from controller import protocol as P
from controller.client import ConnectionLost, NoLeader, open_controller
from controller.election import Leader
from controller.group import GroupConfig, Member
from controller.server import Server, serve_listeners
from virtfs.agent import Session


@asynccontextmanager
async def standby(sock: Path, leader: str | None) -> AsyncIterator[Server]:
    """A controller server at unix:sock that does not lead; it names leader."""
    async def dispatch(op: str, args: dict[str, object], conn: object) -> object:
        raise AssertionError(f"a standby served {op}")

    server = Server(dispatch, leader=lambda: (False, leader))
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_listeners, server, [f"unix:{sock}"])
        yield server
        nursery.cancel_scope.cancel()


async def test_a_client_goes_on_to_the_leader_a_standby_names(controller: ControllerProc,
                                                              tmp_path: Path) -> None:
    gone = f"unix:{tmp_path / 'gone.sock'}"
    async with standby(tmp_path / "s1.sock", controller.addr), \
            standby(tmp_path / "s2.sock", None):
        s1, s2 = f"unix:{tmp_path / 's1.sock'}", f"unix:{tmp_path / 's2.sock'}"
        # a dead member, then a standby that names the leader (not in the list)
        async with open_controller(f"{gone},{s1}") as c:
            assert c.addr == controller.addr
            assert (await c.call("status"))["disks"] is not None
        # the leader itself, first in the list
        async with open_controller(f"{controller.addr},{s1}") as c:
            assert c.addr == controller.addr
        # one address, a standby: it still follows to the leader
        async with open_controller(s1) as c:
            assert c.addr == controller.addr
        # nobody leads: the error names each address and why
        with pytest.raises(ConnectionLost) as ei:
            async with open_controller(f"{gone},{s2}"):
                pass
        msg = ei.value.message
        assert msg.startswith("no leader among the controllers: "), msg
        assert gone in msg and "No such file or directory" in msg, msg
        assert f"{s2}: not the leader, and no leader is elected yet" in msg, msg
        assert isinstance(ei.value, NoLeader) and ei.value.answered  # s2 answered
        with pytest.raises(NoLeader) as nl:
            async with open_controller(f"{gone},{gone}x"):
                pass
        assert not nl.value.answered


async def test_a_standby_answers_hello_with_the_leaders_address(tmp_path: Path) -> None:
    """The wire answer itself: code not_leader, the leader's address as a field."""
    from controller.client import Client, connect_stream
    async with standby(tmp_path / "s.sock", "tcp://10.0.0.7:7800"):
        stream = await connect_stream(f"unix:{tmp_path / 's.sock'}")
        client = Client(stream, None)
        async with trio.open_nursery() as nursery:
            await nursery.start(client._reader)
            with pytest.raises(P.RemoteError) as ei:
                await client.call("hello", version=P.PROTOCOL_VERSION, role="admin",
                                  name="t")
            nursery.cancel_scope.cancel()
        await stream.aclose()
    assert ei.value.code == P.E_NOT_LEADER
    assert ei.value.leader == "tcp://10.0.0.7:7800"
    assert ei.value.message == "not the leader; the leader is tcp://10.0.0.7:7800"


def test_vdctl_and_a_mount_take_a_list_of_addresses(controller: ControllerProc,
                                                    mount_factory, tmp_path: Path) -> None:
    addrs = f"unix:{tmp_path / 'gone.sock'},{controller.addr}"
    r = run_vdctl("--controller", addrs, "container", "add", "c1", str(tmp_path / "c1.img"),
                  "--size", "64M")
    assert r.rc == 0, r.err
    r = run_vdctl("--controller", addrs, "disk", "create", "x", "--size", "16M")
    assert r.rc == 0, r.err
    m = mount_factory("m", controller=addrs)
    assert (m.path / "x").stat().st_size == 16 << 20
    assert f"registered with the controller at {controller.addr} " in m.log()
    # the oracle fails where no address answers
    r = run_vdctl("--controller", f"unix:{tmp_path / 'gone.sock'}", "status")
    assert r.rc != 0 and "gone.sock" in r.err, r.err


@pytest.mark.parametrize("bad", ["unix:/a.sock,,unix:/b.sock", ",", "unix:/a.sock,udp://x:1"])
def test_a_bad_address_list_is_refused_with_its_reason(bad: str, tmp_path: Path) -> None:
    r = run_vdctl("--controller", bad, "status")
    assert r.rc == 2 and "bad address" in r.err.strip().splitlines()[-1], r.err
    mnt = tmp_path / "m"
    mnt.mkdir()
    p = subprocess.run([str(BIN / "virtfs-mount"), str(mnt), "--controller", bad],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "bad address" in p.stderr.strip().splitlines()[-1], p.stderr


def test_a_standby_never_names_itself_as_the_leader() -> None:
    """A member whose term ended may still see its own term on the leader key (cut off
    from etcd, it hears of no change): it says no leader is known rather than sending
    clients back to itself (seen in tests/multihost/test_group_netns.py)."""
    me, other = "tcp://10.0.0.1:7800", "tcp://10.0.0.2:7800"
    m = Member(SimpleNamespace(client=None),  # type: ignore[arg-type]
               GroupConfig(etcd="http://127.0.0.1:1", advertise=me))
    assert m.leadership() == (False, None)
    m.leader = Leader("c1", me, 3, 7)
    assert m.leadership() == (False, None)
    m.leader = Leader("c2", other, 66, 8)
    assert m.leadership() == (False, other)


async def test_an_agent_tries_the_member_it_lost_last_at_the_end() -> None:
    """A leader cut off from the network answers no connect either: an agent that lost
    it leaves it out while the others answer, for a lease at most, then tries it last
    (docs/ha.md); never a hello timeout on it before the new leader."""
    a, b, c = "tcp://10.0.0.1:7800", "tcp://10.0.0.2:7800", "tcp://10.0.0.3:7800"
    s = Session(f"{a},{b},{c}", "/m")
    s.lease = 6.0
    assert s.addrs_to_try() == f"{a},{b},{c}"
    s.lost_addr, s.lost_at, s.skip_lost = a, trio.current_time(), True
    assert s.addrs_to_try() == f"{b},{c}"
    s.skip_lost = False  # no other member answered
    assert s.addrs_to_try() == f"{b},{c},{a}"
    s.skip_lost, s.lost_at = True, trio.current_time() - 6.0  # a lease ago
    assert s.addrs_to_try() == f"{b},{c},{a}"
    s.lost_addr = "tcp://10.0.0.9:7800"  # a leader a standby named, not in the list
    assert s.addrs_to_try() == f"{a},{b},{c}"
    one = Session(a, "/m")
    one.lost_addr, one.lost_at, one.skip_lost = a, trio.current_time(), True
    assert one.addrs_to_try() == a
