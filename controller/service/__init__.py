"""The controller's operations: one module per noun; this class joins them.

Each operation validates, plans, records through the journal and replies.
Planning and ``journal.record`` happen in one step of the event loop (no
await between them), so concurrent requests never plan against a stale
table; the reply waits for the group commit.

- ``base``: shared state (state, journal, agents, locks) and small helpers
- ``placement``: where new space goes, zeroing and releasing it
- ``coherence``: the rows agents get, restrict -> drain -> ack, pushes
- ``containers``, ``disks``: the admin nouns
- ``sessions``: agent registration, heartbeats, acks
- ``faults``: an agent's tables and its faults
- ``files``: allocation ahead of writes (fallocate, sequential writers)
- ``movement``: one segment's move (start, write faults, copier, commit, abort),
  container fail/restore
- ``jobs``: migrate and drain jobs that run moves in the background
- ``snapshots``: snapshots, clones, rollback; copy-on-write through the moves
"""

from __future__ import annotations

import os
import time
from typing import Any

from .. import protocol as P
from ..consistency import check
from .base import MAX_MAP_ROWS, VERSION
from .containers import ContainerOps
from .disks import DiskOps
from .faults import FaultOps
from .files import FileOps
from .jobs import JobOps
from .sessions import SessionOps

__all__ = ["MAX_MAP_ROWS", "VERSION", "Service"]


class Service(ContainerOps, DiskOps, SessionOps, FileOps, FaultOps, JobOps):
    async def status(self) -> dict[str, Any]:
        s = self.state
        return {
            "version": VERSION,
            "protocol": P.PROTOCOL_VERSION,
            "pid": os.getpid(),
            "state_dir": self.state_dir,
            "uptime": round(time.time() - self.started, 3),
            "seq": s.seq,
            "containers": len(s.containers),
            "disks": len(s.disks),
            "agents": len(self.agents.to_list()),
            "lease": self.agents.lease,
            "capacity": sum(c.usable for c in s.containers.values()),
            "used": sum(c.used for c in s.containers.values()),
            "journal_bytes": self.journal.journal_bytes,
            "commits": self.journal.commits,
            "checkpoints": self.journal.checkpoints,
        }

    async def check(self) -> dict[str, Any]:
        problems = check(self.state)
        errors = [p for p in problems if p.level == "error"]
        return {
            "ok": not errors,
            "errors": len(errors),
            "leaks": len(problems) - len(errors),
            "problems": [p.to_dict() for p in problems],
            "disks": len(self.state.disks),
            "containers": len(self.state.containers),
            "extents": sum(len(d.extents) for d in self.state.disks.values()),
        }

    async def dispatch(self, op: str, args: dict[str, Any], conn: Any = None) -> Any:
        method = getattr(self, op.replace(".", "_"), None)
        if method is None:
            raise P.RemoteError(P.E_UNSUPPORTED, f"operation {op!r} is not implemented")
        if op in P.CONN_OPS:
            return await method(conn=conn, **args)
        return await method(**args)

