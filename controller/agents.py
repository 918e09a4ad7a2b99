"""Agents the controller knows: their leases, open disks, and pushes with acknowledgement.

An agent holds a lease renewed by heartbeats. Before the controller changes,
frees or shares storage behind entries an agent caches, it pushes the
restricted entries and waits for the agent's ack (sent once the agent has
drained in-flight I/O on them). An agent that does not answer is waited out:
once its lease has expired it no longer uses any entry, so the change is safe.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from .fsutil import fsync_dir
from .tables import Disk

log = logging.getLogger(__name__)

DEFAULT_LEASE = 10.0
LEASE_MARGIN = 0.5  # clocks differ: wait this much past a lease before trusting it gone

Sender = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class OpenRef:
    """One disk an agent has open, and how many times."""

    disk: Disk
    count: int = 0


@dataclass
class Agent:
    id: int
    name: str
    host: str
    mount: str
    send: Sender | None  # None while disconnected
    lease_until: float  # trio clock
    registered: float = field(default_factory=time.time)
    # open disks by the disk's uid (Disk.uid), not by name, so a rename (or a rename
    # racing an open) can neither lose an open nor merge two disks' opens
    opens: dict[int, OpenRef] = field(default_factory=dict)
    kick: Callable[[], None] | None = None  # close its connection

    @property
    def connected(self) -> bool:
        return self.send is not None


class AgentRegistry:
    def __init__(self, lease: float = DEFAULT_LEASE, marker: str | None = None):
        self.lease = lease
        # marker: a file that exists while agents may hold leases. A controller that
        # starts and finds it must wait out those leases before freeing storage.
        self.marker = marker
        self.agents: dict[int, Agent] = {}
        self._next_id = 1
        self._next_pid = 1
        self._acks: dict[int, trio.Event] = {}
        # After a controller start, agents of the previous incarnation may still
        # hold leases we know nothing of; nothing is freed before this passes.
        stale = marker is not None and os.path.exists(marker)
        self.grace_until = trio.current_time() + (lease + LEASE_MARGIN if stale else 0.0)

    def mark(self) -> None:
        """Create the marker durably (blocking: run it in a thread, before register)."""
        if self.marker is not None and not os.path.exists(self.marker):
            fd = os.open(self.marker, os.O_WRONLY | os.O_CREAT, 0o600)
            os.fsync(fd)
            os.close(fd)
            fsync_dir(os.path.dirname(self.marker))

    def shutdown(self) -> None:
        """On a clean stop: if no agent is left, the next start needs no grace period."""
        self.expire()
        if self.marker is not None and not self.agents and self.grace_until <= trio.current_time():
            try:
                os.unlink(self.marker)
            except FileNotFoundError:
                pass

    def register(self, name: str, host: str, mount: str, send: Sender,
                 kick: Callable[[], None] | None = None) -> Agent:
        a = Agent(self._next_id, name, host, mount, send, trio.current_time() + self.lease,
                  kick=kick)
        self._next_id += 1
        self.agents[a.id] = a
        log.info("agent %d (%s on %s, %s) registered", a.id, name, host, mount)
        return a

    def renew(self, a: Agent) -> None:
        a.lease_until = trio.current_time() + self.lease

    def disconnected(self, a: Agent) -> None:
        """The connection dropped: keep the agent (and what it caches) until its lease ends."""
        a.send = None
        if a.id not in self.agents:
            return
        log.info("agent %d (%s) disconnected; lease ends in %.1f s", a.id, a.name,
                 max(0.0, a.lease_until - trio.current_time()))

    def drop(self, a: Agent) -> None:
        """Forget an agent whose lease ran out, and cut its connection if it has one.

        Were it kept connected, a paused agent that wakes up would renew its lease
        with a stale table that no longer receives pushes.
        """
        self.agents.pop(a.id, None)
        kick, a.kick, a.send = a.kick, None, None
        if kick is not None:
            kick()

    def remove(self, a: Agent) -> None:
        self.agents.pop(a.id, None)
        log.info("agent %d (%s) signed off", a.id, a.name)

    def expire(self) -> None:
        now = trio.current_time()
        for a in list(self.agents.values()):
            if now > a.lease_until + LEASE_MARGIN:
                log.info("agent %d (%s) lease expired; forgetting it", a.id, a.name)
                self.drop(a)

    def caching(self, disk: Disk, exclude: Agent | None = None) -> list[Agent]:
        """Agents (lease not yet run out) that have disk open."""
        self.expire()
        return [a for a in self.agents.values() if disk.uid in a.opens and a is not exclude]

    @staticmethod
    def open(a: Agent, disk: Disk) -> None:
        """Count one more open of disk by agent a."""
        ref = a.opens.setdefault(disk.uid, OpenRef(disk))
        ref.count += 1

    @staticmethod
    def close(a: Agent, uid: int) -> bool:
        """Count one open of the disk with this uid less; False if a had it not open."""
        ref = a.opens.get(uid)
        if ref is None:
            return False
        ref.count -= 1
        if ref.count <= 0:
            del a.opens[uid]
        return True

    def ack(self, pid: int) -> bool:
        ev = self._acks.get(pid)
        if ev is None:
            return False
        ev.set()
        return True

    async def wait_grace(self) -> None:
        delay = self.grace_until - trio.current_time()
        if delay > 0:
            log.info("waiting %.1f s for leases of a previous controller's agents", delay)
            await trio.sleep(delay)

    async def notify(self, msg: dict[str, Any], timeout: float = 2.0,
                     exclude: Agent | None = None) -> None:
        """A hint for every connected agent (e.g. the disk list changed), acked within timeout."""
        agents = [a for a in self.agents.values() if a.connected and a is not exclude]
        with trio.move_on_after(timeout):
            await self.push_all(agents, msg)

    async def push_all(self, agents: list[Agent], msg: dict[str, Any]) -> None:
        """Push msg to each agent and wait for every ack (or that agent's lease to run out)."""
        if not agents:
            return
        async with trio.open_nursery() as n:
            for a in agents:
                n.start_soon(self._push_one, a, dict(msg))

    async def _push_one(self, a: Agent, msg: dict[str, Any]) -> None:
        pid = self._next_pid
        self._next_pid += 1
        msg["pid"] = pid
        ev = trio.Event()
        self._acks[pid] = ev
        try:
            while True:
                if a.send is not None:
                    # never leave half a frame on the stream: the send is shielded from
                    # our callers' timeouts and bounded by the lease on its own
                    with trio.CancelScope(shield=True), trio.move_on_after(self.lease) as sc:
                        try:
                            await a.send(msg)
                        except Exception as e:  # a broken connection
                            log.info("push to agent %d failed: %s", a.id, e)
                            self.disconnected(a)
                    if sc.cancelled_caught:
                        log.warning("agent %d (%s) does not read its pushes; dropping it",
                                    a.id, a.name)
                        self.drop(a)
                        return
                # wait for the ack, or until the lease (which the ack would have renewed)
                # has certainly run out
                deadline = a.lease_until + LEASE_MARGIN
                with trio.move_on_at(deadline):
                    await ev.wait()
                    self.renew(a)
                    return
                if trio.current_time() >= a.lease_until + LEASE_MARGIN:
                    log.warning("agent %d (%s) did not acknowledge push %d; its lease has "
                                "expired, so it no longer uses the entries; dropping it (it "
                                "must register again and reload its tables)", a.id, a.name, pid)
                    self.drop(a)
                    return
                # the lease was renewed by a heartbeat meanwhile: push again
        finally:
            self._acks.pop(pid, None)

    def to_list(self) -> list[dict[str, Any]]:
        self.expire()
        now = trio.current_time()
        return [
            {
                "id": a.id,
                "name": a.name,
                "host": a.host,
                "mount": a.mount,
                "connected": a.connected,
                "lease_left": round(max(0.0, a.lease_until - now), 3),
                "registered": a.registered,
                "disks": sorted(ref.disk.name for ref in a.opens.values()),
            }
            for a in sorted(self.agents.values(), key=lambda a: a.id)
        ]
