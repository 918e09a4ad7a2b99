"""Shared state of the service and the small helpers every operation uses."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import trio

from .. import __version__
from .. import protocol as P
from ..agents import DEFAULT_LEASE, AgentRegistry
from ..journal import Journal
from ..state import Container, Disk, State
from .coherence import Coherence
from .context import Context
from .placement import Placement

log = logging.getLogger(__name__)

VERSION = __version__
MAX_MAP_ROWS = 65536




class ServiceBase:
    def __init__(self, state: State, journal: Journal, state_dir: str, *,
                 lease: float = DEFAULT_LEASE):
        self.state = state
        self.journal = journal
        self.state_dir = state_dir
        self.started = time.time()
        self.agents = AgentRegistry(lease, os.path.join(state_dir, "agents.live"))
        self.ctx = Context(state, journal, self.agents)
        self._record = self.ctx.record
        self.placement = Placement(self.ctx)
        self.coherence = Coherence(self.ctx)
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

    async def start(self) -> None:
        await self.coherence.start()

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
