"""Background jobs that move data: disk migration and container drain.

A job is journaled (``job.start`` / ``job.end``), so a restarted controller
resumes it; its moves resume from their persisted bitmaps. A job moves a
bounded number of segments at a time (MOVES_IN_FLIGHT), each with
service/movement.py's steps. Progress is worked out from the table (bytes
still to move), so it needs no records of its own.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import trio

from .. import protocol as P
from ..extents import MOVING, Extent
from ..jobplan import JobPlan, plan_drain, plan_migrate, split_shared
from ..moves import move_units
from ..records import DiskPlace, JobAbort, JobEnd, JobStart
from ..state import Disk, Job
from ..units import human
from .context import Context
from .copier import Pacer
from .movement import MoveGone, Movement
from .placement import Placement
from .relocation import Relocation

log = logging.getLogger(__name__)

MOVES_IN_FLIGHT = 4
STALL_LOOKS = 600  # looks (0.1 s apart) at shared storage that cannot move before failing


@dataclass
class _Progress:
    """Volatile progress of a running job (trio clock times, bytes)."""

    total: int
    started: float
    aborting: bool = False
    done_event: trio.Event = field(default_factory=trio.Event)
    batch: trio.CancelScope | None = None  # the moves in flight, cancelled by an abort
    pace: Pacer = field(default_factory=Pacer)  # the job's rate limit, for all its moves


class Jobs:
    """Migrate and drain jobs, run in the service's background nursery.

    Owns the running jobs' volatile progress (by job id) and the default rate limit of
    new jobs' copies (copy_rate, bytes/s, 0: none; the controller's --copy-rate).
    """

    def __init__(self, ctx: Context, placement: Placement, movement: Movement,
                 relocation: Relocation, copy_rate: int = 0):
        self.copy_rate = copy_rate
        self.ctx = ctx
        self.relocation = relocation
        self.state = ctx.state
        self.journal = ctx.journal
        self.agents = ctx.agents
        self.placement = placement
        self.movement = movement
        self._progress: dict[int, _Progress] = {}

    # ------------------------------------------------------------ the runner
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Run (and resume) jobs for the service's life; moves without a running job
        (their job ended in a crash between its last move and its end) finish too."""
        async with self.ctx.open_background() as n:
            task_status.started()
            for j in list(self.state.jobs.values()):
                if j.state == "running":
                    n.start_soon(self._run_job, j.id)
            # moves whose job ended (or was lost) between its last move and its end;
            # the running jobs' own moves are resumed by those jobs
            running = [j for j in self.state.jobs.values() if j.state == "running"]
            for d in list(self.state.disks.values()):
                for vs in list(d.alts):
                    e = d.extents.find(vs)
                    if e is not None and not any(
                            j.disk == d.name or (j.kind == "drain" and j.src == e.lun)
                            for j in running):
                        self.movement.spawn_move(d, vs)
            await trio.sleep_forever()

    def _units(self, j: Job) -> list[tuple[Disk, int, int]]:
        """(disk, vstart, length) of every piece the job still has to move."""
        out = []
        disks = ([self.state.disks[j.disk]] if j.disk in self.state.disks else []
                 ) if j.disk is not None else list(self.state.disks.values())
        for d in disks:
            for e in d.extents:
                if e.flags & MOVING:  # not done until it commits
                    a = d.alts[e.vstart]
                    if j.kind == "migrate" or j.src in (e.lun, a.lun):
                        out.append((d, e.vstart, e.length))
                    continue
                if (j.kind == "migrate" and e.lun != j.dst) or (
                        j.kind == "drain" and e.lun == j.src):
                    out.append((d, e.vstart, e.length))
        return out

    def plan(self, j: Job) -> JobPlan:
        """What job j still has to move (controller/jobplan.py, as its dry run shows)."""
        if j.kind == "drain" and j.src is not None:
            return plan_drain(self.state, j.src, j.dst)
        if j.kind == "migrate" and j.disk is not None and j.dst is not None:
            return plan_migrate(self.state, j.disk, j.dst)
        return JobPlan(j.kind, j.src, j.dst)

    def remaining(self, j: Job) -> int:
        """Bytes job j still has to move: live data and shared storage (plan)."""
        return self.plan(j).total

    async def _relocate_some(self, j: Job, pace: Pacer) -> tuple[int, bool]:
        """Relocate up to MOVES_IN_FLIGHT units of the shared storage job j moves, one
        after another, each paced by the job's rate limit (pace) once copied; (bytes
        moved, whether any unit is left)."""
        units = self.plan(j).units
        moved = 0
        for u in units[:MOVES_IN_FLIGHT]:
            n = await self.relocation.relocate(u, j.dst)
            moved += n
            await pace.take(n)
        return moved, bool(units)

    async def _run_job(self, jid: int) -> None:
        j = self.state.jobs[jid]
        prog = self._progress.setdefault(jid, _Progress(self.remaining(j),
                                                         trio.current_time()))
        prog.pace.rate = j.rate  # journaled with the job: a restart keeps it
        state: str | None = None  # None: journal no end (cancelled: it resumes later)
        message = ""
        prog.aborting = prog.aborting or j.aborting  # asked before a restart
        try:
            await self.agents.wait_grace()
            stalls = 0
            while not prog.aborting:
                # shared storage first: it moves whole, and a disk's shared segments go
                # with it (moving them block by block would copy them, not move them)
                moved, shared_left = await self._relocate_some(j, prog.pace)
                todo = self._next_units(j)
                if not todo:
                    if not shared_left or stalls >= STALL_LOOKS:
                        break
                    stalls = 0 if moved else stalls + 1
                    if not moved:
                        await trio.sleep(0.1)  # a segment that maps it is being moved
                    continue
                # start the batch's moves in order (their new space then follows the
                # disk's order and merges again), then copy them side by side
                started: list[tuple[Disk, int]] = []
                for d, unit in todo:
                    started += await self._start_one(j, d, unit)
                if not started:
                    await trio.sleep(0.1)  # the table changed under us: look again
                    continue
                with trio.CancelScope() as prog.batch:
                    if prog.aborting:
                        prog.batch.cancel()
                    async with trio.open_nursery() as n:
                        for d, vs in started:
                            n.start_soon(self.movement.run_move, d, vs, prog.pace)
                prog.batch = None
            if prog.aborting:
                await self._roll_back(j)
                await self._restore_placement(j)
                state, message = "aborted", "aborted by request"
            elif j.disk is not None and j.disk not in self.state.disks:
                state, message = "failed", f"disk {j.disk!r} was removed"
            elif self.remaining(j):
                state, message = "failed", "data is left to move (see the log)"
            else:
                state = "done"
        except* (P.RemoteError, OSError) as group:
            # errors from the moves come wrapped by their nursery: the job fails, the
            # service goes on; moves it leaves half done resume at the next start
            first = group.exceptions[0]
            state, message = "failed", getattr(first, "message", None) or str(first)
            log.error("job %d (%s) failed: %s", jid, j.kind, message)
        finally:
            if state is not None and self.state.jobs.get(jid) is j and j.state == "running":
                try:
                    self.journal.record(JobEnd(jid, state, message, round(time.time(), 3)))
                except RuntimeError as e:  # the journal closed: a stop; resumes later
                    log.info("job %d: end not recorded: %s", jid, e)
            prog.done_event.set()
            self._progress.pop(jid, None)

    def _next_units(self, j: Job) -> list[tuple[Disk, Extent | int]]:
        """What to do next, at most MOVES_IN_FLIGHT things: a move to resume (its vstart)
        or a piece of an extent to start moving."""
        out: list[tuple[Disk, Extent | int]] = []
        if j.disk is not None:
            disks = [self.state.disks[j.disk]] if j.disk in self.state.disks else []
        else:
            disks = list(self.state.disks.values())
        stay = j.dst if j.kind == "migrate" else None
        for d in disks:
            for e in d.extents:
                if j.kind == "drain" and e.lun != j.src and not (
                        e.flags & MOVING and d.alts[e.vstart].lun == j.src):
                    continue  # (a move onto the container is finished, then moved off)
                if e.flags & MOVING:
                    out.append((d, e.vstart))  # finish it (moving off src, or to dst)
                elif e.lun != stay:
                    # only the disk's own parts: shared ones are relocated whole
                    for lo, hi in split_shared(self.state, d, e)[1]:
                        for u in move_units(d, lo, hi, stay):
                            out.append((d, u))
                            if len(out) >= MOVES_IN_FLIGHT:
                                return out
                if len(out) >= MOVES_IN_FLIGHT:
                    return out
        return out

    async def _start_one(self, j: Job, d: Disk, unit: Extent | int) -> list[tuple[Disk, int]]:
        """Start moving unit (or take up a move already started: its vstart); the moves to
        run, as (disk, vstart)."""
        if isinstance(unit, int):
            return [(d, unit)]
        if not self.movement.may_start(d):
            return []  # a snapshot of it is being taken: later
        async with self.ctx.dlock(d):
            if self.state.disks.get(d.name) is not d:
                return []
            cur = d.extents.find(unit.vstart)
            if (cur is None or cur.flags & MOVING or cur.lun != unit.lun
                    or cur.vend < unit.vend):
                return []  # changed meanwhile: the next look at the table decides
            try:
                return [(d, vs) for vs in await self.movement.start_move(d, unit, j.dst)]
            except MoveGone as e:
                log.info("job %d: %s", j.id, e)
                return []

    async def _roll_back(self, j: Job) -> None:
        """After an abort: every move the job left half done goes back home."""
        for d, vs, _n in self._units(j):
            e = d.extents.find(vs)
            if e is not None and e.flags & MOVING:
                try:
                    await self.movement.abort_move(d, vs)
                except MoveGone:
                    pass

    # ------------------------------------------------------------ operations
    async def _place(self, places: list[tuple[Disk, int, int | None]]
                     ) -> tuple[tuple[str, int, int | None], ...]:
        """Record where each disk's new space goes now ((disk, home, pin)); the
        placements as they were before, for JobStart.placed (an abort restores them)."""
        before = tuple((d.name, d.home, d.pin) for d, _h, _p in places)
        for d, home, pin in places:
            await self.journal.commit(DiskPlace(d.name, home, pin))
        return before

    async def _restore_placement(self, j: Job) -> None:
        """After an abort: put back where the job's disks allocate (JobStart.placed),
        unless the disk is gone or its old container is gone or failed."""
        for name, home, pin in j.placed:
            d = self.state.disks.get(name)
            old = [self.state.luns.get(x) for x in (home, pin) if x is not None]
            if d is None or any(c is None or c.failed for c in old):
                continue
            if (d.home, d.pin) != (home, pin):
                await self.journal.commit(DiskPlace(name, home, pin))

    async def _start_job(self, kind: str, disk: str | None, src: int | None,
                         dst: int | None, placed: tuple[tuple[str, int, int | None], ...] = (),
                         rate: int = 0) -> dict[str, object]:
        jid = self.state.next_job
        await self.journal.commit(JobStart(jid, kind, disk, src, dst, round(time.time(), 3),
                                           placed, rate))
        j = self.state.jobs[jid]
        self._progress[jid] = _Progress(self.remaining(j), trio.current_time())
        self.ctx.spawn(self._run_job, jid)
        return self.job_dict(j)

    async def disk_migrate(self, name: str, to: str, dry_run: bool = False,
                           rate: int | None = None) -> dict[str, object]:
        """Start moving every extent of disk name to container `to` while it is in use,
        and the storage its snapshots map outside `to` (controller/jobplan.py:
        plan_migrate; clones sharing it are switched with it). dry_run: journal
        nothing, return the plan (JobPlan.to_dict) with "dry_run": true.

        New space for the disk goes to `to` from now on (its home; its pin too, if it
        had one), also for a disk with no data to move (the job then ends done at once).
        rate: the copy's limit in bytes/s (0: none; None: the controller's copy_rate),
        journaled with the job (job.start), so it holds after a restart.
        Raises RemoteError: E_NOT_FOUND, E_INVALID (already wholly there and placed there),
        E_BUSY (a job already moves it), E_IO (the target is failed), E_NO_SPACE.
        """
        _check_rate(rate)
        d = self.ctx.disk(name)
        c = self.ctx.container(to)
        if c.failed:
            raise P.RemoteError(P.E_IO, f"container {to!r} is failed")
        if c.drained:
            raise P.invalid(f"container {to!r} is drained; take it back into use first "
                            f"(vdctl container restore {to})")
        for j in self.state.jobs.values():
            if j.state == "running" and (j.disk == d.name or j.kind == "drain"):
                raise P.RemoteError(P.E_BUSY, f"job {j.id} ({j.kind}) is moving data "
                                    "already; wait for it or abort it (vdctl job abort)")
        plan = plan_migrate(self.state, d.name, c.lun)
        if not plan.total and d.home == c.lun and d.pin in (None, c.lun):
            raise P.invalid(f"disk {name!r} is wholly on container {to!r} already"
                            if d.allocated else f"disk {name!r} holds no data, and its new "
                            f"space goes to container {to!r} already")
        # nothing to move but the placement (an empty thin disk): the job ends at once
        free = self.placement.plannable(c).free
        need = plan.total  # live data and shared storage, each counted once
        if need > free:
            raise P.RemoteError(P.E_NO_SPACE, f"container {to!r} has {human(free)} free; "
                                f"disk {name!r} needs {human(need)}")
        if dry_run:
            return {**plan.to_dict(self.state), "dry_run": True}
        placed = await self._place([(d, c.lun, c.lun if d.pin is not None else None)])
        return await self._start_job("migrate", d.name, None, c.lun, placed,
                                     self.copy_rate if rate is None else rate)

    async def container_drain(self, name: str, to: str | None, dry_run: bool = False,
                              rate: int | None = None) -> dict[str, object]:
        """Start moving everything off container name (to container `to`, or wherever
        placement puts it): the disks' own data block by block, then the storage
        snapshots and clones map, whole (controller/jobplan.py: plan_drain); new
        allocations avoid it meanwhile. The job ends done only when no table maps
        anything there. dry_run: journal nothing, return the plan (JobPlan.to_dict)
        with "dry_run": true. rate: as disk_migrate's, for both the block-by-block
        moves and the relocation of shared storage.

        Raises RemoteError: E_NOT_FOUND, E_INVALID (into itself, nowhere to go, a
        negative rate), E_IO (the target is failed), E_BUSY (a job runs), E_NO_SPACE."""
        _check_rate(rate)
        c = self.ctx.container(name)
        dst = self.ctx.container(to).lun if to is not None else None
        if dst == c.lun:
            raise P.invalid(f"cannot drain container {name!r} into itself")
        if dst is not None and self.state.luns[dst].failed:
            raise P.RemoteError(P.E_IO, f"container {to!r} is failed")
        others = [o for o in self.state.containers.values()
                  if o.lun != c.lun and not o.failed and not o.draining and not o.drained]
        if not others:
            raise P.invalid(f"container {name!r} is the only usable container: there is "
                            "nowhere to drain it to")
        for j in self.state.jobs.values():
            if j.state == "running":
                raise P.RemoteError(P.E_BUSY, f"job {j.id} ({j.kind}) is moving data "
                                    "already; wait for it or abort it (vdctl job abort)")
        room = sum(self.placement.plannable(o).free for o in (
            [self.state.luns[dst]] if dst is not None else others))
        if c.used > room:
            raise P.RemoteError(P.E_NO_SPACE, f"container {name!r} holds {human(c.used)}; "
                                f"only {human(room)} is free elsewhere")
        if dry_run:
            return {**plan_drain(self.state, c.lun, dst).to_dict(self.state), "dry_run": True}
        home = dst if dst is not None else others[0].lun
        placed = await self._place([  # pins and homes move off it
            (d, home, home if d.pin is not None else None)
            for d in self.state.disks.values() if d.pin == c.lun or d.home == c.lun])
        return await self._start_job("drain", None, c.lun, dst, placed,
                                     self.copy_rate if rate is None else rate)

    def job_dict(self, j: Job) -> dict[str, object]:
        """A job as vdctl shows it: ids, containers, state, and a running job's progress
        (total and done bytes, rate in bytes/s, percent, eta in seconds)."""
        prog = self._progress.get(j.id)
        luns = self.state.luns
        out: dict[str, object] = {
            "id": j.id, "kind": j.kind, "disk": j.disk,
            "from": luns[j.src].name if j.src in luns else None,
            "to": luns[j.dst].name if j.dst in luns else None,
            "state": j.state, "started": j.started, "ended": j.ended, "message": j.message,
            "rate_limit": j.rate or None,  # bytes/s; None: no limit
        }
        if j.state == "running" and prog is not None:
            left = self.remaining(j)
            done = max(0, prog.total - left)
            elapsed = max(1e-6, trio.current_time() - prog.started)
            rate = done / elapsed
            out.update(total=prog.total, done=done, rate=round(rate),
                       progress=round(100 * done / prog.total, 1) if prog.total else 100.0,
                       eta=round(left / rate, 1) if rate > 0 else None,
                       aborting=prog.aborting)
        else:
            out.update(total=None, done=None, rate=None,
                       progress=100.0 if j.state == "done" else None, eta=None,
                       aborting=False)
        return out

    async def job_ls(self) -> list[dict[str, object]]:
        """Every job, by id, with the progress of running ones."""
        return [self.job_dict(j) for j in sorted(self.state.jobs.values(), key=lambda j: j.id)]

    async def job_abort(self, id: int) -> dict[str, object]:
        """Stop a running job: the moves it has in flight go back to where they came from
        (segments it finished stay moved); returns once the job has ended."""
        j = self.state.jobs.get(id)
        if j is None:
            raise P.RemoteError(P.E_NOT_FOUND, f"no such job: {id}")
        if j.state != "running":
            raise P.invalid(f"job {id} has ended already ({j.state})")
        await self.journal.commit(JobAbort(id))  # a restart rolls back too
        prog = self._progress.get(id)
        if prog is not None:
            prog.aborting = True
            if prog.batch is not None:
                prog.batch.cancel()  # stop copying; the moves are rolled back
            await prog.done_event.wait()
        return self.job_dict(j)


def _check_rate(rate: int | None) -> None:
    """E_INVALID for a negative copy rate (bytes/s; 0: no limit; None: the default)."""
    if rate is not None and rate < 0:
        raise P.invalid(f"rate must be 0 (no limit) or more bytes per second, not {rate}")


__all__ = ["Jobs", "MoveGone"]
