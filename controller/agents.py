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
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from .fsutil import fsync_dir
from .roster import Roster
from .tables import Disk
from .writegate import WriteGate, unfenced

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
    # its session's entry in the roster (controller/roster.py): the agent's token, or
    # one the controller drew for an agent that sent none ("" without a roster)
    token: str = ""
    current: bool = False  # heartbeat after registering: every table it has is ours

    @property
    def connected(self) -> bool:
        return self.send is not None


class AgentRegistry:
    """The agents with a lease, and the grace after a start (docs/fencing.md).

    lease: seconds; marker: a file that exists while agents may hold leases; roster:
    the directory of controller/roster.py (None: no roster, the whole lease is always
    waited out after a start that finds the marker); may_write: the controller's
    write gate, asked before each roster write (controller/writegate.py).
    """

    def __init__(self, lease: float = DEFAULT_LEASE, marker: str | None = None,
                 roster: str | None = None, may_write: WriteGate = unfenced):
        self.lease = lease
        # marker: a file that exists while agents may hold leases. A controller that
        # starts and finds it must wait out those leases before freeing storage.
        self.marker = marker
        self.roster = Roster(roster, may_write) if roster is not None else None
        self.agents: dict[int, Agent] = {}
        self._next_id = 1
        self._next_pid = 1
        self._acks: dict[int, trio.Event] = {}
        # After a controller start, agents of the previous incarnation may still
        # hold leases we know nothing of; nothing is freed before this passes
        # (the deadline), unless every one of them is back and current (settled).
        self.stale = marker is not None and os.path.exists(marker)
        self.grace_until = trio.current_time() + (lease + LEASE_MARGIN if self.stale else 0.0)
        self.started = trio.current_time()
        # the previous run's roster tokens not yet back and current; None: unknown
        self.pending: set[str] | None = None
        self.settled = trio.Event()
        if not self.stale:
            self.settled.set()
        self._roster_lock = trio.Lock()
        self.spawn: Callable[..., None] | None = None  # Context.spawn, for removals

    def load_roster(self, boot: int) -> None:
        """After a start that found the marker: the previous run's sessions, from the
        roster if it is that run's (boot: the journal's last boot number, before this
        start journals its own). Blocking (small reads), before anything is served."""
        if not self.stale or self.roster is None:
            return
        tokens = self.roster.load(boot)
        if tokens is None:
            log.info("no roster of the previous run's agents: their leases are waited out "
                     "in full")
            return
        self.pending = tokens
        log.info("%d agent session(s) of the previous run may hold a lease", len(tokens))
        self._check_settled()

    async def begin(self, boot: int) -> None:
        """Make the roster this run's (boot: its boot number), after its boot is
        journaled and before any agent registers. On failure the roster is left to a
        run before: the next start then waits out every lease in full."""
        if self.roster is None:
            return
        try:
            async with self._roster_lock:
                await trio.to_thread.run_sync(self.roster.set_boot, boot)
        except OSError as e:
            log.warning("agents' roster %s: %s; a start after this run will wait out "
                        "its agents' leases in full", self.roster.path, e)

    async def run(self) -> None:
        """For the service's life: once the grace deadline passed, unlist the previous
        run's sessions that did not come back (their leases have run out)."""
        await trio.sleep_until(self.grace_until)
        left = self.pending or set()
        self.pending = set()
        self.settled.set()
        for token in sorted(left):
            await self._unlist(token)

    def _check_settled(self) -> None:
        if self.pending is not None and not self.pending and not self.settled.is_set():
            self.settled.set()
            early = self.grace_until - trio.current_time()
            if early > 0:
                log.info("every agent of the previous run is back and current after %.2f s: "
                         "the grace ends %.1f s before its deadline",
                         trio.current_time() - self.started, early)

    def current(self, a: Agent) -> None:
        """a heartbeats: its session reloaded every table it had open before (the agent
        heartbeats only after that, virtfs/agent.py), so no push of ours can miss it."""
        if a.current:
            return
        a.current = True
        if self.pending is not None and a.token in self.pending:
            self.pending.discard(a.token)
            log.info("agent %d (%s) of the previous run is back and current (%d not back "
                     "yet)", a.id, a.name, len(self.pending))
            self._check_settled()

    async def enroll(self, name: str, host: str, mount: str, send: Sender,
                     kick: Callable[[], None] | None = None, token: str = "") -> Agent:
        """register(), with the marker made and the session listed in the roster first,
        durably (token: the agent's; "" for an agent that sends none: one is drawn that
        never comes back, so a start after this run waits its lease out in full).
        OSError (Fenced in a deposed leader) if that cannot be written."""
        if self.roster is not None and not token:
            token = secrets.token_hex(16)
        async with self._roster_lock:
            await trio.to_thread.run_sync(self._enlist, token)
            # no checkpoint between here and the registration: an unlisting queued for
            # an earlier session of this token sees this one (_unlist)
        a = self.register(name, host, mount, send, kick=kick)
        a.token = token
        return a

    def _enlist(self, token: str) -> None:
        self.mark()
        if self.roster is not None:
            self.roster.add(token)

    def _forget(self, a: Agent) -> None:
        """a no longer holds a lease: unlist its session in the background."""
        if a.token and self.roster is not None and self.spawn is not None:
            try:
                self.spawn(self._unlist, a.token)
            except RuntimeError:
                pass  # the service stops: the entry stays, the next start waits longer

    async def _unlist(self, token: str) -> None:
        """Remove token's entry unless an agent with a lease still has it."""
        if self.roster is None:
            return
        async with self._roster_lock:
            if any(a.token == token for a in self.agents.values()):
                return
            try:
                await trio.to_thread.run_sync(self.roster.remove, token)
            except OSError as e:
                log.info("agents' roster: %s stays listed: %s", token, e)

    def mark(self) -> None:
        """Create the marker durably (blocking: run it in a thread, before register)."""
        if self.marker is not None and not os.path.exists(self.marker):
            fd = os.open(self.marker, os.O_WRONLY | os.O_CREAT, 0o600)
            os.fsync(fd)
            os.close(fd)
            fsync_dir(os.path.dirname(self.marker))

    def shutdown(self) -> None:
        """On a clean stop: if no agent is left, the next start needs no grace period
        (the marker goes, and every roster entry). Blocking: small unlinks."""
        self.expire()
        if (self.marker is not None and not self.agents
                and (self.settled.is_set() or self.grace_until <= trio.current_time())):
            try:
                os.unlink(self.marker)
            except FileNotFoundError:
                pass
            if self.roster is not None:
                try:  # no entry of a session gone may pass for one of the next run's
                    self.roster.clear()
                except OSError as e:
                    log.info("agents' roster %s: %s", self.roster.path, e)

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
        self._forget(a)
        kick, a.kick, a.send = a.kick, None, None
        if kick is not None:
            kick()

    def remove(self, a: Agent) -> None:
        self.agents.pop(a.id, None)
        self._forget(a)
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
        """Wait until no agent of the previous run can write where a push of ours would
        forbid it: every session in its roster is back and current (settled), or the
        deadline (lease + margin after the start) passed (docs/fencing.md)."""
        if self.settled.is_set():
            return
        delay = self.grace_until - trio.current_time()
        if delay > 0:
            waiting = "" if self.pending is None else f" ({len(self.pending)} not back yet)"
            log.info("waiting up to %.1f s for leases of a previous controller's agents%s",
                     delay, waiting)
            with trio.move_on_at(self.grace_until):
                await self.settled.wait()

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
