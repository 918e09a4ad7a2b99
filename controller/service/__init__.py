"""The controller's operations: a thin facade over the parts of the service.

Each operation validates, plans, records through the journal and replies.
Planning and ``journal.record`` happen in one step of the event loop (no
await between them), so concurrent requests never plan against a stale
table; the reply waits for the group commit.

``Service`` has one method per protocol op (``dispatch`` maps op "disk.create"
to ``disk_create``), each handing the request to the part that does it. The
parts are objects, each owning its volatile state and naming what it uses in
its ``__init__``:

- ``context``: ``Context``, what every part shares: the tables, the journal,
  the agents, the per-disk locks, the disks being removed, the background
  nursery, and ``record`` (the one helper that journals a planned change)
- ``placement``: ``Placement``, where new space goes, zeroing and releasing it;
  the reservations; ``place``, the one path new space takes
- ``coherence``: ``Coherence``, the rows agents get, restrict/freeze -> drain
  -> ack, pushes; the restricted and frozen ranges and the version stamp
- ``movement``: ``Movement``, one segment's move (start, write faults), container
  fail/restore, the suspect containers; it owns ``copier`` (``copier.Copier``: the
  copier's steps, commit, abort, the moves' runners)
- ``jobs``: ``Jobs``, migrate and drain jobs that run moves in the background;
  their progress
- ``snapshots``: ``Snapshots``, snapshots, clones, rollback; copy-on-write
  through the moves
- ``containers``, ``disks``: ``Containers``, ``Disks``, the admin nouns
- ``sessions``: ``Sessions``, agent registration, heartbeats, acks
- ``faults``: ``Faults``, an agent's tables and its faults
- ``files``: ``Files``, allocation ahead of writes, trim, times, unlink, close
- ``qos``, ``perms``: ``Qos``, ``Perms``, a disk's QoS limits and its owner, group and
  mode (set by vdctl, or by chmod and chown through a mount)
- ``backup``: ``Backup``, changed ranges between snapshots (snap.diff) and reads of
  a snapshot's bytes (snap.read), for export-diff; read-only

Each part uses only parts built before it (``Service.__init__``): placement
and coherence use the context alone; movement uses both; jobs and snapshots
use movement; disks and faults use snapshots; files uses faults and disks;
containers and sessions use movement; qos, perms and backup use the context alone.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable

import trio

from .. import __version__
from .. import protocol as P
from ..agents import DEFAULT_LEASE, AgentRegistry
from ..consistency import check
from ..journal import Journal
from ..state import State
from .backup import Backup
from .coherence import Coherence
from .containers import Containers
from .context import Caller, Context
from .disks import MAX_MAP_ROWS, Disks
from .faults import Faults
from .files import Files
from .jobs import Jobs
from .labels import Labels
from .movement import Movement
from .perms import Perms
from .placement import Placement
from .qos import Qos
from .relocation import Relocation
from .sessions import Sessions
from .snapshots import Snapshots

__all__ = ["MAX_MAP_ROWS", "VERSION", "Service"]

VERSION = __version__


class Service:
    """The controller's service: one method per op, each delegating to a part.

    state: the tables as recovered; journal: open for records; state_dir: where
    the state lives (agents.live and agents.roster go there); lease: the agents' lease (seconds);
    copy_rate: jobs' default copy limit (bytes/s, 0: none); lazy_marks: answer first
    writes to moving or shared segments before their marks are durable (Faults).
    """

    def __init__(self, state: State, journal: Journal, state_dir: str, *,
                 lease: float = DEFAULT_LEASE, copy_rate: int = 0, lazy_marks: bool = False):
        self.state = state
        self.journal = journal
        self.state_dir = state_dir
        self.started = time.time()
        # roster writes ask the controller's write gate (a group's leader sets it later)
        self.agents = AgentRegistry(lease, os.path.join(state_dir, "agents.live"),
                                    os.path.join(state_dir, "agents.roster"),
                                    may_write=lambda: self.ctx.may_write())
        self.agents.load_roster(state.boot)  # the previous run's sessions (before start())
        self.ctx = Context(state, journal, self.agents)
        self.agents.spawn = self.ctx.spawn
        self.placement = Placement(self.ctx)
        self.coherence = Coherence(self.ctx)
        self.movement = Movement(self.ctx, self.placement, self.coherence)
        self.relocation = Relocation(self.ctx, self.placement, self.coherence, self.movement)
        self.jobs = Jobs(self.ctx, self.placement, self.movement, self.relocation, copy_rate)
        self.snapshots = Snapshots(self.ctx, self.placement, self.coherence, self.movement)
        self.labels = Labels(self.ctx, self.movement, self.placement)
        self.containers = Containers(self.ctx, self.movement, self.labels)
        self.disks = Disks(self.ctx, self.placement, self.coherence, self.movement,
                           self.snapshots)
        self.sessions = Sessions(self.ctx, self.movement)
        self.qos = Qos(self.ctx)
        self.perms = Perms(self.ctx)
        self.faults = Faults(self.ctx, self.placement, self.coherence, self.movement,
                             self.snapshots, lazy_marks)
        self.files = Files(self.ctx, self.coherence, self.faults, self.disks)
        self.backup = Backup(self.ctx)
        # what a server calls: dispatch, or dispatch wrapped by the metrics' timing
        self.serve: Callable[[str, dict[str, object], Caller | None], Awaitable[object]] = (
            self.dispatch)

    async def start(self) -> None:
        """Journal this start before anything is answered (Coherence.start), make the
        agents' roster this run's (AgentRegistry.begin), then check every container's
        label (Labels.check_all)."""
        await self.coherence.start()
        await self.agents.begin(self.state.boot)
        await self.labels.check_all()

    async def run_jobs(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                       ) -> None:
        """Run (and resume) jobs and moves (Jobs.run), the labels' heartbeat and
        relocations (Labels.run), the removal of unlinked disks whose last agent
        died (Files.reap_deleted), and of snapshots a crash left half removed
        (Snapshots.resume_rm), for the service's life."""
        async with trio.open_nursery() as n:
            await n.start(self.jobs.run)
            self.ctx.spawn(self.labels.run)
            self.ctx.spawn(self.agents.run)
            self.ctx.spawn(self.files.reap_deleted)
            self.ctx.spawn(self.snapshots.resume_rm)
            task_status.started()

    async def dispatch(self, op: str, args: dict[str, object], conn: Caller | None = None
                       ) -> object:
        """Call op's method with args (validated by the server), and conn for the
        ops in protocol.CONN_OPS; RemoteError E_UNSUPPORTED for an op with none."""
        method = getattr(self, op.replace(".", "_"), None)
        if method is None:
            raise P.RemoteError(P.E_UNSUPPORTED, f"operation {op!r} is not implemented")
        if op in P.CONN_OPS:
            return await method(conn=conn, **args)
        return await method(**args)

    # ------------------------------------------------------------ the controller
    async def status(self) -> dict[str, object]:
        """status: the controller's figures (version, uptime, counts, bytes)."""
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

    async def group_step_down(self, to: str | None = None) -> dict[str, object]:
        """group.step_down at a controller that runs alone: there is no group (a group's
        member answers it itself, controller/group.py)."""
        raise P.invalid("this controller runs alone (no --etcd): there is no group and no "
                        "leadership to hand over")

    async def check(self) -> dict[str, object]:
        """check: the invariants of the tables (consistency.check), problems listed."""
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

    # ------------------------------------------------------------ containers
    async def container_add(self, name: str, path: str, size: int | None,
                            force: bool = False, shared: bool = False) -> dict[str, object]:
        """container.add: Containers.container_add."""
        return await self.containers.container_add(name, path, size, force, shared)

    async def container_set(self, name: str, shared: bool) -> dict[str, object]:
        """container.set: Containers.container_set."""
        return await self.containers.container_set(name, shared)

    async def container_ls(self) -> list[dict[str, object]]:
        """container.ls: Containers.container_ls."""
        return await self.containers.container_ls()

    async def container_info(self, name: str) -> dict[str, object]:
        """container.info: Containers.container_info."""
        return await self.containers.container_info(name)

    async def container_rm(self, name: str, dry_run: bool = False) -> dict[str, object]:
        """container.rm: Containers.container_rm."""
        return await self.containers.container_rm(name, dry_run)

    async def container_fail(self, name: str) -> dict[str, object]:
        """container.fail: Movement.container_fail."""
        return await self.movement.container_fail(name)

    async def container_restore(self, name: str, relabel: bool = False) -> dict[str, object]:
        """container.restore: Labels.restore (then Movement.container_restore)."""
        return await self.labels.restore(name, relabel)

    # ------------------------------------------------------------ disks
    async def disk_set(self, name: str, limits: dict[str, int | None]) -> dict[str, object]:
        """disk.set: Qos.disk_set."""
        return await self.qos.disk_set(name, limits)

    async def disk_create(self, name: str, size: int, thick: bool, segment_size: int | None,
                          container: str | None, uid: int | None = None,
                          gid: int | None = None, mode: int | None = None
                          ) -> dict[str, object]:
        """disk.create: Disks.disk_create."""
        return await self.disks.disk_create(name, size, thick, segment_size, container,
                                            uid, gid, mode)

    async def disk_perms(self, name: str, uid: int | None = None, gid: int | None = None,
                         mode: int | None = None, conn: Caller | None = None
                         ) -> dict[str, object]:
        """disk.perms: Perms.disk_perms."""
        return await self.perms.disk_perms(name, uid, gid, mode, conn)

    async def disk_ls(self, snapshots: bool = False) -> list[dict[str, object]]:
        """disk.ls: Disks.disk_ls."""
        return await self.disks.disk_ls(snapshots)

    async def disk_info(self, name: str) -> dict[str, object]:
        """disk.info: Disks.disk_info."""
        return await self.disks.disk_info(name)

    async def disk_map(self, name: str, start: int, limit: int | None) -> dict[str, object]:
        """disk.map: Disks.disk_map."""
        return await self.disks.disk_map(name, start, limit)

    async def disk_resize(self, name: str, size: int, allow_shrink: bool,
                          grow_only: bool = False, dry_run: bool = False,
                          conn: Caller | None = None) -> dict[str, object]:
        """disk.resize: Disks.disk_resize."""
        return await self.disks.disk_resize(name, size, allow_shrink, grow_only, conn,
                                            dry_run=dry_run)

    async def disk_rm(self, name: str, dry_run: bool = False, conn: Caller | None = None
                      ) -> dict[str, object]:
        """disk.rm: Disks.disk_rm."""
        return await self.disks.disk_rm(name, conn, dry_run=dry_run)

    async def disk_rename(self, name: str, new: str, replace: bool) -> dict[str, object]:
        """disk.rename: Disks.disk_rename."""
        return await self.disks.disk_rename(name, new, replace)

    async def disk_discard(self, name: str, offset: int, length: int,
                           conn: Caller | None = None) -> dict[str, object]:
        """disk.discard: Disks.disk_discard."""
        return await self.disks.disk_discard(name, offset, length, conn)

    # ------------------------------------------------------------ jobs
    async def disk_migrate(self, name: str, to: str, dry_run: bool = False,
                           rate: int | None = None
                           ) -> dict[str, object]:
        """disk.migrate: Jobs.disk_migrate."""
        return await self.jobs.disk_migrate(name, to, dry_run, rate)

    async def container_drain(self, name: str, to: str | None, dry_run: bool = False,
                              rate: int | None = None) -> dict[str, object]:
        """container.drain: Jobs.container_drain."""
        return await self.jobs.container_drain(name, to, dry_run, rate)

    async def job_ls(self) -> list[dict[str, object]]:
        """job.ls: Jobs.job_ls."""
        return await self.jobs.job_ls()

    async def job_abort(self, id: int) -> dict[str, object]:
        """job.abort: Jobs.job_abort."""
        return await self.jobs.job_abort(id)

    # ------------------------------------------------------------ snapshots
    async def snap_create(self, name: str) -> dict[str, object]:
        """snap.create: Snapshots.snap_create."""
        return await self.snapshots.snap_create(name)

    async def snap_ls(self, name: str | None = None) -> list[dict[str, object]]:
        """snap.ls: Snapshots.snap_ls."""
        return await self.snapshots.snap_ls(name)

    async def snap_rm(self, name: str, dry_run: bool = False) -> dict[str, object]:
        """snap.rm: Snapshots.snap_rm."""
        return await self.snapshots.snap_rm(name, dry_run)

    async def snap_rollback(self, name: str, force: bool, dry_run: bool = False
                            ) -> dict[str, object]:
        """snap.rollback: Snapshots.snap_rollback."""
        return await self.snapshots.snap_rollback(name, force, dry_run)

    async def disk_clone(self, name: str, new: str) -> dict[str, object]:
        """disk.clone: Snapshots.disk_clone."""
        return await self.snapshots.disk_clone(name, new)

    async def snap_diff(self, name: str, from_snap: str | None, start: int,
                        limit: int | None) -> dict[str, object]:
        """snap.diff: Backup.snap_diff."""
        return await self.backup.snap_diff(name, from_snap, start, limit)

    async def snap_read(self, name: str, offset: int, length: int) -> dict[str, object]:
        """snap.read: Backup.snap_read."""
        return await self.backup.snap_read(name, offset, length)

    # ------------------------------------------------------------ agents
    async def agent_register(self, name: str, host: str, mount: str, conn: Caller,
                             token: str = "") -> dict[str, object]:
        """agent.register: Sessions.agent_register."""
        return await self.sessions.agent_register(name, host, mount, conn, token)

    async def agent_heartbeat(self, conn: Caller) -> dict[str, object]:
        """agent.heartbeat: Sessions.agent_heartbeat."""
        return await self.sessions.agent_heartbeat(conn)

    async def agent_bye(self, conn: Caller) -> None:
        """agent.bye: Sessions.agent_bye."""
        await self.sessions.agent_bye(conn)

    async def agent_ack(self, pid: int) -> bool:
        """agent.ack: Sessions.agent_ack."""
        return await self.sessions.agent_ack(pid)

    async def agent_ls(self) -> list[dict[str, object]]:
        """agent.ls: Sessions.agent_ls."""
        return await self.sessions.agent_ls()

    async def io_error(self, name: str, lun: int, offset: int, message: str) -> None:
        """io.error: Sessions.io_error."""
        await self.sessions.io_error(name, lun, offset, message)

    # ------------------------------------------------------------ an agent's disks
    async def disk_open(self, name: str, conn: Caller) -> dict[str, object]:
        """disk.open: Faults.disk_open."""
        return await self.faults.disk_open(name, conn)

    async def disk_table(self, name: str, conn: Caller) -> dict[str, object]:
        """disk.table: Faults.disk_table."""
        return await self.faults.disk_table(name, conn)

    async def disk_fault(self, name: str, offset: int, length: int, write: bool,
                         conn: Caller) -> dict[str, object]:
        """disk.fault: Faults.disk_fault."""
        return await self.faults.disk_fault(name, offset, length, write, conn)

    async def disk_sync(self, name: str, boot: int, seq: int, conn: Caller) -> None:
        """disk.sync: Faults.disk_sync."""
        await self.faults.disk_sync(name, boot, seq, conn)

    async def disk_close(self, name: str, handle: int | None, conn: Caller) -> None:
        """disk.close: Files.disk_close."""
        await self.files.disk_close(name, handle, conn)

    async def disk_allocate(self, name: str, offset: int, length: int, reserve: bool,
                            conn: Caller, least: int | None = None) -> dict[str, object]:
        """disk.allocate: Files.disk_allocate."""
        return await self.files.disk_allocate(name, offset, length, reserve, conn, least)

    async def disk_trim(self, name: str, size: int, expect: int,
                        conn: Caller) -> dict[str, object]:
        """disk.trim: Files.disk_trim."""
        return await self.files.disk_trim(name, size, expect, conn)

    async def disk_times(self, name: str, mtime: float, stime: float,
                         conn: Caller) -> dict[str, object]:
        """disk.times: Files.disk_times."""
        return await self.files.disk_times(name, mtime, stime, conn)

    async def disk_unlink(self, name: str, conn: Caller) -> dict[str, object]:
        """disk.unlink: Files.disk_unlink."""
        return await self.files.disk_unlink(name, conn)
