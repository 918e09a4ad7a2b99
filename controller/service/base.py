"""Shared state of the service and the small helpers every operation uses."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from .. import __version__
from .. import protocol as P
from ..agents import DEFAULT_LEASE, Agent, AgentRegistry
from ..journal import Journal
from ..records import ControllerBoot, Record, decode
from ..state import Container, Disk, State, StateError

log = logging.getLogger(__name__)

VERSION = __version__
MAX_MAP_ROWS = 65536


_NO_LOCK = contextlib.nullcontext()
VERSION_BITS = 44  # version stamps per controller start: 1.7e13 (years at 100k/s)
FAULT_WAIT = 30.0  # longest a fault waits for a restriction on its range to lift



class ServiceBase:
    def __init__(self, state: State, journal: Journal, state_dir: str, *,
                 lease: float = DEFAULT_LEASE):
        self.state = state
        self.journal = journal
        self.state_dir = state_dir
        self.started = time.time()
        self.agents = AgentRegistry(lease, os.path.join(state_dir, "agents.live"))
        # space planned for requests still zeroing it (LUN -> [(offset, length)]): later
        # plans go around it (see placement)
        self._reserved: dict[int, list[tuple[int, int]]] = {}
        # movement (service/movement.py, service/jobs.py): copier steps in progress by
        # (disk uid, move vstart); moves with a runner; suspect containers (LUN ->
        # (errors reported, the last one)); running jobs' progress; the jobs' nursery
        self._copying: dict[tuple[int, int], Any] = {}
        self._move_runners: dict[tuple[int, int], trio.Event] = {}
        self._suspect: dict[int, tuple[int, str | None]] = {}
        self._progress: dict[int, Any] = {}
        self._job_nursery: Any = None
        # disks (uid) whose segments may not start moving now (a snapshot settles them)
        self._no_new_moves: set[int] = set()
        self._adding_paths: set[str] = set()  # container paths a container.add is probing
        # ranges whose entries are being restricted at agents before a change (disk -> ranges)
        # restricted ranges per disk, keyed by Disk.uid so a rename cannot orphan them
        self._restricted: dict[int, list[tuple[int, int]]] = {}
        # frozen ranges per disk (uid): entries there are nowrite at every agent and
        # write faults wait (a snapshot being taken); reads go on
        self._frozen: dict[int, list[tuple[int, int]]] = {}
        # disks being removed (uid): no new opens, tables or faults for them
        self._removing: set[int] = set()
        self._restriction_lifted = trio.Event()
        # resize, discard, rename-over, rm and fault allocation of one disk, one at a time
        self._disk_locks: dict[int, trio.Lock] = {}
        # stamps every table answer and push ("v"), so an agent can tell an answer that was
        # overtaken by a later change (it then faults again instead of using it). Never
        # from a clock (one stepped back would make every answer look stale): each start
        # journals a new boot number (see start()) and counts up from boot << VERSION_BITS.
        self.version = state.boot << VERSION_BITS

    async def start(self) -> None:
        """Journal this start (a "controller.boot" record) before anything is answered.

        Version stamps then begin above every stamp the previous incarnation could have
        sent: it started from a smaller boot number and made fewer than 2**VERSION_BITS.
        """
        await self.journal.commit(ControllerBoot(self.state.boot + 1))
        self.version = self.state.boot << VERSION_BITS

    def _container(self, name: str) -> Container:
        c = self.state.containers.get(name)
        if c is None:
            raise P.not_found("container", name)
        return c

    async def _copying_done(self, d: Disk, start: int = 0, end: int = P.MAX_DISK_SIZE
                            ) -> None:
        """Wait until no copier step overlaps [start, end) of d: call it, holding d's lock,
        before freeing storage there, or a late copy could land in space given to
        someone else."""
        for (uid, vs), c in list(self._copying.items()):
            e = d.extents.find(vs)
            if uid == d.uid and e is not None:
                lo = e.vstart + c.first * P.BLOCK_SIZE
                if lo < end and start < lo + c.count * P.BLOCK_SIZE:
                    await c.done.wait()

    def _container_dict(self, c: Container) -> dict[str, Any]:
        """A container as vdctl shows it: state ok, draining, error (failed) or suspect
        (agents reported I/O errors on it), with the count and the last error."""
        info = c.to_dict()
        s = self._suspect.get(c.lun)
        if s is not None and not c.failed:
            info["state"] = "suspect"
        info["errors"] = s[0] if s else 0
        info["last_error"] = s[1] if s else None
        return info

    def _disk(self, name: str) -> Disk:
        d = self.state.disks.get(name)
        if d is None:
            raise P.not_found("disk", name)
        return d

    def _disk_info(self, d: Disk) -> dict[str, Any]:
        return d.to_dict(self.state.luns)

    def _live_disk(self, name: str) -> Disk:
        """A disk, or a snapshot ("DISK@SNAP", read-only), for an agent's open or fault."""
        d = self.state.snaps.get(name) if "@" in name else self.state.disks.get(name)
        if d is None or d.uid in self._removing:
            raise P.not_found("disk", name)
        return d

    def _dlock(self, d: Disk) -> trio.Lock:
        lk = self._disk_locks.get(d.uid)
        if lk is None:
            lk = self._disk_locks[d.uid] = trio.Lock()
        return lk

    @asynccontextmanager
    async def _dlocks(self, *disks: Disk) -> AsyncIterator[None]:
        """Several disk locks, always taken in the same order (no AB/BA deadlock)."""
        async with contextlib.AsyncExitStack() as stack:
            for d in sorted({x.uid: x for x in disks}.values(), key=lambda x: x.uid):
                await stack.enter_async_context(self._dlock(d))
            yield

    def _bump(self) -> int:
        self.version += 1
        return self.version

    def _record(self, rec: Record | dict[str, object]) -> int:
        """Journal rec (see Journal.record); a refusal is an internal error.

        Transitional: a dict is decoded into its Record (records.decode) until every
        call site builds a Record."""
        try:
            if isinstance(rec, dict):
                rec = decode(rec)
            return self.journal.record(rec)
        except StateError as e:  # a planning bug: refuse the request, change nothing
            log.error("refused %s: %s", rec.OP if isinstance(rec, Record) else rec.get("op"), e)
            raise P.RemoteError(P.E_INTERNAL, f"internal error: {e}") from None

    def _agent(self, conn: Any) -> Agent:
        a = getattr(conn, "agent", None)
        if a is None:
            raise P.RemoteError(P.E_PROTOCOL, "register first (agent.register)")
        return a
