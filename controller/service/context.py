"""What every part of the service shares: the tables, the journal, the agents, the
per-disk locks, the disks being removed, the background nursery, and the one helper
that records a planned change."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Protocol

import trio

from .. import protocol as P
from ..agents import Agent, AgentRegistry
from ..journal import Journal
from ..records import Record
from ..state import Container, Disk, State, StateError
from ..writegate import WriteGate, unfenced

log = logging.getLogger(__name__)



def split_snap_name(full: str) -> tuple[str, str]:
    """'DISK@SNAP' -> (disk, snap); RemoteError E_INVALID for anything else."""
    if not isinstance(full, str) or full.count(P.SNAP_SEP) != 1:
        raise P.invalid(f"{full!r} is not DISK@SNAP (one '@' between a disk and a snapshot "
                        "name)")
    disk, snap = P.split_snapshot_name(full)
    P.check_name(disk, "disk name")
    P.check_name(snap, "snapshot name")
    if len(full.encode()) > P.MAX_NAME_BYTES:
        raise P.invalid(f"{full!r} is longer than {P.MAX_NAME_BYTES} bytes of UTF-8")
    return disk, snap

class Caller(Protocol):
    """The connection a request came on (server.Connection), as the service uses it."""

    agent: Agent | None  # set by agent.register
    closed: bool
    on_close: list[Callable[[], None]]

    async def send(self, msg: dict[str, object]) -> None:
        """Send msg (a push) on the connection."""

    def abort(self) -> None:
        """Close the connection at once."""


class Context:
    """The state every component of the service works on, and the locks they share.

    state: the authoritative tables (changed only through the journal); journal: the
    group committer; agents: the registry of agents and their leases.
    """

    def __init__(self, state: State, journal: Journal, agents: AgentRegistry):
        self.state = state
        self.journal = journal
        self.agents = agents
        # resize, discard, rename-over, rm and fault allocation of one disk, one at a time
        self._disk_locks: dict[int, trio.Lock] = {}
        # disks being removed (uid): no new opens, tables or faults for them
        self._removing: set[int] = set()
        # the nursery of the service's background tasks (jobs, moves), while Jobs.run runs
        self._background: trio.Nursery | None = None
        # whether this controller may still write containers (copies, zeroing, punches,
        # heartbeats): always when it runs alone; a group's leader only while its term
        # lasts (GroupTerm.may_write). A writegate.WriteGate: read-only, thread-safe; the
        # worker threads doing the I/O ask it before each write (writegate.gate)
        self.may_write: WriteGate = unfenced

    # ------------------------------------------------------------ recording
    def record(self, rec: Record, before: Callable[[], None] | None = None) -> int:
        """Apply and journal rec in this step of the event loop; its seq (not yet
        durable: wait for it). before: Journal.record's (a flush rec depends on). A
        record the state refuses is a planning bug: the request is refused
        (RemoteError E_INTERNAL) and nothing changes."""
        try:
            return self.journal.record(rec, before)
        except StateError as e:  # a planning bug: refuse the request, change nothing
            log.error("refused %s: %s", rec.OP, e)
            raise P.RemoteError(P.E_INTERNAL, f"internal error: {e}") from None

    # ------------------------------------------------------------ lookups
    def container(self, name: str) -> Container:
        """The container called name; RemoteError E_NOT_FOUND if none."""
        c = self.state.containers.get(name)
        if c is None:
            raise P.not_found("container", name)
        return c

    def disk(self, name: str) -> Disk:
        """The disk called name (not a snapshot); RemoteError E_NOT_FOUND if none."""
        d = self.state.disks.get(name)
        if d is None:
            raise P.not_found("disk", name)
        return d

    def snapshot(self, name: str) -> Disk:
        """The snapshot called name ("DISK@SNAP"); RemoteError E_INVALID if name is not
        one (split_snap_name), E_NOT_FOUND if there is none."""
        split_snap_name(name)
        s = self.state.snaps.get(name)
        if s is None:
            raise P.not_found("snapshot", name)
        return s

    def table(self, name: str) -> Disk:
        """The disk, or the snapshot ("DISK@SNAP"), called name, for what only reads it
        (disk.info, disk.map); RemoteError E_NOT_FOUND if none."""
        return self.snapshot(name) if P.is_snapshot_name(name) else self.disk(name)

    def live_disk(self, name: str) -> Disk:
        """A disk, or a snapshot ("DISK@SNAP", read-only), for an agent's open or fault;
        RemoteError E_NOT_FOUND if none or being removed (now, or a snapshot since a
        snap.trim record)."""
        d = self.state.snaps.get(name) if P.is_snapshot_name(name) else self.state.disks.get(name)
        if d is None or d.uid in self._removing or d.removing:
            raise P.not_found("disk", name)
        return d

    def disk_info(self, d: Disk) -> dict[str, object]:
        """A disk as vdctl shows it."""
        return d.to_dict(self.state.luns)

    def agent(self, conn: Caller | None) -> Agent:
        """The agent registered on conn; RemoteError E_PROTOCOL if none."""
        a = getattr(conn, "agent", None)
        if a is None:
            raise P.RemoteError(P.E_PROTOCOL, "register first (agent.register)")
        return a

    # ------------------------------------------------------------ locks
    def dlock(self, d: Disk) -> trio.Lock:
        """d's lock: changes to one disk's map take it, one at a time."""
        lk = self._disk_locks.get(d.uid)
        if lk is None:
            lk = self._disk_locks[d.uid] = trio.Lock()
        return lk

    @asynccontextmanager
    async def dlocks(self, *disks: Disk) -> AsyncIterator[None]:
        """Several disk locks, always taken in the same order (no AB/BA deadlock)."""
        async with contextlib.AsyncExitStack() as stack:
            for d in sorted({x.uid: x for x in disks}.values(), key=lambda x: x.uid):
                await stack.enter_async_context(self.dlock(d))
            yield

    def forget_lock(self, d: Disk) -> None:
        """Drop the lock of a disk that is gone."""
        self._disk_locks.pop(d.uid, None)

    def removing(self, d: Disk) -> bool:
        """Whether d is being removed (inside removal(d))."""
        return d.uid in self._removing

    @contextlib.contextmanager
    def removal(self, d: Disk) -> Iterator[None]:
        """For the block, d is being removed: nobody may open it, fetch its table or
        fault on it (live_disk refuses it)."""
        self._removing.add(d.uid)
        try:
            yield
        finally:
            self._removing.discard(d.uid)

    # ------------------------------------------------------------ background tasks
    @asynccontextmanager
    async def open_background(self) -> AsyncIterator[trio.Nursery]:
        """The nursery the service's background tasks (jobs, moves) run in, for the
        block."""
        async with trio.open_nursery() as n:
            self._background = n
            yield n

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run fn(*args) in the background nursery; RuntimeError if it is not open."""
        if self._background is None:
            raise RuntimeError("the service's background tasks are not running")
        self._background.start_soon(fn, *args)
