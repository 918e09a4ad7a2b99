"""Moving segments between containers while agents use them (docs/movement.md).

One segment's move, step by step (docs/movement.md has the diagram):

1. start: plan and zero the alternate location L2, record ``move.start`` (the
   segment's entries become: marked blocks at L2, the rest ``nowrite`` at L1),
   push those entries to every agent that has the disk open and wait for each
   to drain its I/O there and acknowledge. From then on nobody writes L1.
2. write fault: an agent's write to unmarked blocks faults. The controller
   copies those blocks L1 -> L2 (durably), records ``move.mark``, pushes the
   new entries to the *other* agents (drained, acknowledged: none may read
   those blocks from L1 any more), then answers the writer, who writes at L2.
3. copier: copies a batch of unmarked blocks in steps, flushes the batch once,
   marks it in one record, then publishes it (pushed at L2 to every agent,
   drained, then writable, so later writes there need no fault). A write fault
   on blocks being copied waits for that step, so a copy never overwrites a
   block a host wrote meanwhile.
4. commit: every block is marked: push entries that are plainly at L2 to every
   agent (draining reads in flight on L1), punch L1, record ``move.commit``,
   which frees L1.
5. abort: restrict the segment at every agent (drained), copy marked blocks
   back L2 -> L1, record ``move.abort``, which frees L2.

Every step is a record through the one apply, so a restarted controller
resumes from the persisted bitmap; it waits first (``agents.wait_grace``) until
every previous agent is back with reloaded tables or its lease has run out, since
one of them may not have acknowledged step 1's push.

New space for a move goes through placement's one path (``Placement.place``),
as a thin fault's does. Container fail and restore are here too: they change
what agents may do with every entry of a container, moving or not.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from .. import faultpoints, storage
from .. import moves as M
from .. import protocol as P
from ..agents import Agent
from ..extents import MOVING, Extent
from ..records import ContainerFail, ContainerRestore, MoveAbort, MoveCommit, MoveMark, MoveStart
from ..state import Container, Disk, round_up
from ..tables import Alt
from ..units import human
from .coherence import Coherence
from .context import Context
from .placement import Placement

log = logging.getLogger(__name__)


class Pacer:
    """A copier's rate limit, shared by the moves of one job: take(n) returns once n more
    bytes fit under rate bytes/s since the pacer's first step (no credit is saved up
    while copying runs slower). rate 0: no limit."""

    def __init__(self, rate: int = 0):
        self.rate = rate
        self._next = 0.0  # trio clock: when the bytes taken so far fit the rate

    async def take(self, n: int) -> None:
        """Wait until n more bytes (already copied) fit the rate."""
        if self.rate <= 0:
            return
        self._next = max(trio.current_time(), self._next) + n / self.rate
        await trio.sleep_until(self._next)


class MoveGone(Exception):
    """The segment is no longer moving (committed, aborted, discarded or removed)."""


@dataclass
class _Copying:
    """Blocks of one move that the copier is copying right now (write faults wait)."""

    first: int
    count: int
    done: trio.Event = field(default_factory=trio.Event)


class Movement:
    """Segments moving between containers, and the state of containers for agents.

    Owns the copier steps in progress (by (disk uid, move vstart); write faults on
    their blocks wait), the moves that have a runner, the disks whose segments may
    not start moving now (a snapshot settles them), and the suspect containers (LUN
    -> (I/O errors agents reported, the last one)).
    """

    def __init__(self, ctx: Context, placement: Placement, coherence: Coherence):
        self.ctx = ctx
        self.state = ctx.state
        self.journal = ctx.journal
        self.agents = ctx.agents
        self._record = ctx.record
        self.placement = placement
        self.coherence = coherence
        self._copying: dict[tuple[int, int], _Copying] = {}
        self._move_runners: dict[tuple[int, int], trio.Event] = {}
        self._no_new_moves: set[int] = set()
        self._suspect: dict[int, tuple[int, str | None]] = {}
        self.published_bytes = 0  # bytes the copier published (a counter, volatile)

    # ------------------------------------------------------------ lookups
    def move_of(self, d: Disk, vstart: int) -> tuple[Extent, Alt]:
        """The moving extent of d at vstart and its alternate location; MoveGone if
        there is no move there (any more)."""
        if self.state.disks.get(d.name) is not d:
            raise MoveGone(f"disk {d.name!r} is gone")
        a = d.alts.get(vstart)
        e = d.extents.find(vstart) if a is not None else None
        if a is None or e is None or e.vstart != vstart or not e.flags & MOVING:
            raise MoveGone(f"disk {d.name!r}: no move at {vstart}")
        return e, a

    def _paths(self, cs: list[M.Copy]) -> list[tuple[str, int, str, int, int]]:
        lu = self.state.luns
        return [(lu[c.src_lun].path, c.src_offset, lu[c.dst_lun].path, c.dst_offset, c.length)
                for c in cs]

    async def copy(self, cs: list[M.Copy], durable: bool = True,
                   background: bool = False) -> None:
        """Copy cs between containers, durably (durable=False: written, not flushed; a
        write fault's record settles them, _settler, and the copier its batch, _settle);
        background: in a thread at the copier's low priority (storage.low_priority).
        RemoteError E_IO or E_NO_SPACE (E_IO also when this controller may no longer
        write: the copying thread asks ctx.may_write before each chunk, writegate.gate)."""
        if not cs:
            return
        try:
            faultpoints.hit("movement.copy")
            if background:
                await trio.to_thread.run_sync(storage.low_priority, storage.copy_ranges,
                                              self._paths(cs), self.ctx.may_write, durable)
            else:
                await trio.to_thread.run_sync(storage.copy_ranges, self._paths(cs),
                                              self.ctx.may_write, durable)
        except OSError as e:
            code = P.E_NO_SPACE if e.errno == errno.ENOSPC else P.E_IO
            raise P.RemoteError(code, f"copy between containers failed: {e}") from None

    def _settler(self, cs: list[M.Copy]) -> Callable[[], None]:
        """A blocking call that makes copies written with durable=False durable (the
        journal makes it, in its worker thread, before the batch holding the record
        that marks them: Journal.record's before)."""
        ranges = [(dst, doff, n) for _s, _so, dst, doff, n in self._paths(cs)]

        def settle() -> None:
            faultpoints.hit("movement.lazy_settle")
            storage.settle_ranges(ranges)
        return settle

    # ------------------------------------------------------------ 1. start
    async def start_move(self, d: Disk, unit: Extent, dst: int | None,
                         cow: bool = False, durable: bool = True,
                         push: bool = True) -> list[int]:
        """Start moving unit (a piece of one stored extent) to LUN dst (None: wherever
        placement puts new space; never the unit's own container, unless cow: a
        copy-on-write gives a shared segment new space wherever the disk allocates).
        Returns the vstarts of the moves started (one per contiguous piece of new
        space). Hold d's lock. durable=False (a write fault): the ``move.start``
        records are pushed (a restriction only: L1 turns nowrite) without waiting for
        them to be durable; the caller must before it answers anyone with the new
        space writable (docs/movement.md, "Durable at fsync"). push=False: no push
        (the caller knows every agent has the unit nowrite at L1 already: storage a
        snapshot or clone shares all of, Snapshots.copy_on_write).

        Raises RemoteError E_NO_SPACE if the target has no room.
        """
        need = round_up(unit.length)
        if dst is not None:
            cands = [self.state.luns[dst]]
        elif cow:
            cands = self.placement.candidates(d.pin, d.home)
        else:
            cands = [c for c in self.placement.candidates(None, d.home) if c.lun != unit.lun]
        space = None
        for c in cands:
            sp = self.placement.plannable(c)
            if sp.free >= need:
                space = (c, sp)
                break
        if space is None:
            raise P.RemoteError(P.E_NO_SPACE, f"no container has {human(need)} free for "
                                f"disk {d.name!r} at {unit.vstart}")
        c, sp = space
        if c.failed:
            raise P.RemoteError(P.E_IO, f"container {c.name!r} is failed")
        # every piece of new space is reserved now, in the step that planned it: later
        # plans (a thin fault elsewhere) go around all of it until it is recorded
        plan = sp.plan(need)  # contiguous pieces of the target's free space
        started: list[int] = []

        def record(pieces: list[list[int]]) -> int:
            cur = d.extents.find(unit.vstart)
            if (self.state.disks.get(d.name) is not d or cur is None or cur.flags & MOVING
                    or cur.lun != unit.lun or cur.vend < unit.vend
                    or cur.offset + (unit.vstart - cur.vstart) != unit.offset):
                raise MoveGone(f"disk {d.name!r} changed at {unit.vstart}")
            faultpoints.hit("movement.start")
            seq = 0
            pos = unit.vstart
            for off, n in plan:  # all records in one step: no await in between
                length = min(n, unit.vend - pos)
                seq = self._record(MoveStart(d.name, pos, length, c.lun, off))
                started.append(pos)
                pos += length
            return seq

        # L2 is not zeroed: no block of it is read before it is copied or written (an
        # unmarked block is read at L1; a mark follows its copy; an abort copies marked
        # blocks back and frees L2; a commit needs every block marked), so whatever a
        # freed range held there never shows. That keeps a punch and a durable write
        # (a BLKZEROOUT of the segment on a block device) off a first write's path.
        seq = await self.placement.place([[0, n, c.lun, off] for off, n in plan], record,
                                         zero=False)
        if durable:
            await self.journal.wait_durable(seq)
        # every agent now stops writing L1 there (drained, acknowledged)
        if push:
            await self.coherence.push_update(d, unit.vstart, unit.vend, drain=True)
        return started

    # ------------------------------------------------------------ 2. write faults
    async def prepare_moving_write(self, d: Disk, start: int, end: int,
                                   exclude: Agent | None, lazy: bool = False) -> int | None:
        """A write to [start, end) meets moving segments: copy and mark the blocks it
        touches, and remap them at every other agent. Hold d's lock. Returns None if
        the caller must wait for the copier (copying_done) and call again, else the
        seq of the last ``move.mark`` recorded (0: none).

        lazy (docs/movement.md, "Durable at fsync"): the copies are written, not
        flushed, and the marks recorded, not waited for; the journal settles the copies
        before it writes the batch that holds their mark, so a mark is never durable
        without its copies. The writer gets the seq and the agent's next fsync asks for
        it (``disk.sync``). Without lazy, copies and marks are durable on return."""
        touched = [e for e in d.extents.stored_in(start, end) if e.flags & MOVING]
        if not touched:
            return 0
        await self.agents.wait_grace()
        for e in touched:
            first, last = M.blocks_of(e, start, end)
            busy = self._copying.get((d.uid, e.vstart))
            if busy is not None and busy.first < last and first < busy.first + busy.count:
                return None
        seq = 0
        for e in touched:
            a = d.alts[e.vstart]
            first, last = M.blocks_of(e, start, end)
            runs = M.unmarked_runs(a, first, last)
            if not runs:
                continue
            cs = M.copies(e, a, runs)
            # never lazily into a container shared between hosts: the other agents read
            # it with O_DIRECT, so the copy must be on the device before the push below
            # gives them L2 (docs/fencing.md)
            lazy_here = lazy and not self.state.luns[a.lun].shared
            await self.copy(cs, durable=not lazy_here)
            mark = MoveMark(d.name, e.vstart, [(r[0], r[1]) for r in runs])
            if lazy_here:
                seq = self._record(mark, self._settler(cs))
            else:
                seq = self._record(mark)
                await self.journal.wait_durable(seq)
        # the written blocks, whole: every other agent reads them at L2 from now on
        # (drained, acknowledged) before the writer is answered with them writable
        lo = max(min(e.vstart for e in touched), start // P.BLOCK_SIZE * P.BLOCK_SIZE)
        hi = min(max(e.vend for e in touched), round_up(end, P.BLOCK_SIZE))
        await self.coherence.push_update(d, lo, hi, exclude=exclude, drain=True)
        if lazy and self.journal.lazy_seq > self.journal.durable_seq:
            # blocks another fault marked, lazily, come writable too: that mark must be
            # durable before this writer's fsync returns
            seq = max(seq, self.journal.lazy_seq)
        return seq

    # ------------------------------------------------------------ 3. copier
    async def copy_step(self, d: Disk, vstart: int, pace: Pacer | None = None) -> bool:
        """Copy, make durable and mark the next batch of unmarked blocks, then publish
        them; False when none is left.

        A batch is up to moves.COPY_BATCH_BLOCKS blocks (or what is copied in
        moves.COPY_BATCH_SECONDS), copied in steps of
        moves.COPY_CHUNK_BLOCKS (write faults on a step's blocks wait for it; each step
        is paced by pace, at the copier's low priority), then made durable with one
        flush (_settle), marked in one record, and published (_publish)."""
        await faultpoints.hit_async("movement.copier")  # tests hold moves half done here
        runs: list[tuple[int, int]] = []
        total = pos = 0
        until = trio.current_time() + M.COPY_BATCH_SECONDS
        while total < M.COPY_BATCH_BLOCKS and (not runs or trio.current_time() < until):
            async with self.ctx.dlock(d):
                e, a = self.move_of(d, vstart)
                self._check_luns(d, e, a)
                nxt = M.next_copy(a, min(M.COPY_CHUNK_BLOCKS, M.COPY_BATCH_BLOCKS - total),
                                  pos)
                if nxt is None:
                    break
                step = _Copying(*nxt)
                cs = M.copies(e, a, [nxt])
                self._copying[(d.uid, vstart)] = step
            try:
                # faults on these blocks wait; others go on. Not durable yet: a write
                # fault that gets in before the batch is marked copies its blocks again,
                # durably, and marks them itself
                await self.copy(cs, durable=False, background=True)
            finally:
                # wake waiters before taking the lock again: a discard or rm holding the
                # lock waits for this copy to end (never to be marked)
                del self._copying[(d.uid, vstart)]
                step.done.set()
            runs.append(nxt)
            total += nxt[1]
            pos = nxt[0] + nxt[1]
            if pace is not None:
                await pace.take(nxt[1] * P.BLOCK_SIZE)
        if not runs:
            return False
        if not await self._settle(d, vstart, runs):
            return True  # write faults marked every block of the batch themselves
        async with self.ctx.dlock(d):
            e, a = self.move_of(d, vstart)
            n = a.bitmap.nblocks  # a shrink may cut the batch
            runs = [(b, min(c, n - b)) for b, c in runs if b < n]
            if not runs:
                return True
            faultpoints.hit("movement.mark")
            seq = self._record(MoveMark(d.name, vstart, runs))
        await self.journal.wait_durable(seq)
        await self._publish(d, vstart, runs)
        return True

    def _check_luns(self, d: Disk, e: Extent, a: Alt) -> None:
        if self.state.luns[a.lun].failed or self.state.luns[e.lun].failed:
            raise P.RemoteError(P.E_IO, f"disk {d.name!r} at {e.vstart}: a container of "
                                "its move is failed")

    async def _settle(self, d: Disk, vstart: int, runs: list[tuple[int, int]]) -> bool:
        """Make the copies of runs (copied with durable=False) durable with one flush:
        storage.settle_held, whose settling write rewrites a block of the batch that
        is still unmarked, held like a copy step meanwhile (so no write can land there:
        an unmarked block is written by nobody, and a fault on it waits). False if every
        block of runs is marked already (write faults copied and marked them: nothing
        left to settle or mark)."""
        async with self.ctx.dlock(d):
            e, a = self.move_of(d, vstart)
            n = a.bitmap.nblocks
            left = [r for b, c in runs if b < n for r in M.unmarked_runs(a, b, min(b + c, n))]
            if not left:
                return False
            hold = _Copying(left[0][0], 1)
            ranges = [(c.dst_offset, c.length)
                      for c in M.copies(e, a, [(b, min(c, n - b)) for b, c in runs if b < n])]
            path = self.state.luns[a.lun].path
            at = a.offset + hold.first * P.BLOCK_SIZE
            self._copying[(d.uid, vstart)] = hold
        try:
            faultpoints.hit("movement.settle")
            await trio.to_thread.run_sync(storage.low_priority, storage.settle_held, path,
                                          ranges, at, self.ctx.may_write)
        except OSError as err:
            raise P.RemoteError(P.E_IO, f"flushing copies between containers failed: "
                                f"{err}") from None
        finally:
            del self._copying[(d.uid, vstart)]
            hold.done.set()
        return True

    async def _publish(self, d: Disk, vstart: int, runs: list[tuple[int, int]]) -> None:
        """Marked runs of d's move at vstart become writable at L2 for every agent, so a
        later write there needs no fault (docs/movement.md, "published"): first every
        agent that has d open gets them at L2, nowrite, drained and acknowledged (none
        reads them at L1 any more), then they are published and pushed writable. Not
        when the move is wholly marked: its commit pushes plain L2 entries next."""
        async with self.ctx.dlock(d):
            try:
                e, a = self.move_of(d, vstart)
            except MoveGone:
                return
            if a.bitmap.all_set():
                return
            lo = e.vstart + min(b for b, _ in runs) * P.BLOCK_SIZE
            hi = min(e.vend, e.vstart + max(b + c for b, c in runs) * P.BLOCK_SIZE)
            faultpoints.hit("movement.publish")
            await self.coherence.push_update(d, lo, hi, drain=True)
            e, a = self.move_of(d, vstart)
            self.published_bytes += self.coherence.publish(d, vstart, a, runs)
            await self.coherence.push_update(d, lo, hi)

    # ------------------------------------------------------------ 4. commit / 5. abort
    async def _commit_move(self, d: Disk, vstart: int) -> None:
        async with self.ctx.dlock(d):
            e, a = self.move_of(d, vstart)
            if not a.bitmap.all_set():
                raise MoveGone(f"disk {d.name!r} at {vstart}: blocks left to copy")
            # every entry there is at L2 already: make every agent drop reads in flight
            # on L1 before L1 may be reused
            await self.coherence.push_update(d, e.vstart, e.vend, drain=True)
            e, a = self.move_of(d, vstart)
            # L1 goes back to the host, but for what a snapshot or clone still maps
            await self.placement.release_space(self.placement.unshared(d, e))
            faultpoints.hit("movement.commit")
            await self.journal.commit(MoveCommit(d.name, vstart))
            self.coherence.unpublish(d, vstart)
        await self.coherence.push_update(d, e.vstart, e.vend)

    async def abort_move(self, d: Disk, vstart: int) -> None:
        """Roll a move back: its blocks marked at L2 return to L1; L2 is freed."""
        async with self.ctx.dlock(d):
            e, a = self.move_of(d, vstart)
            await self.copying_done(d, e.vstart, e.vend)
            async with self.coherence.restrict(d, e.vstart, e.vend, exclude=None):
                e, a = self.move_of(d, vstart)
                back = [(b, n) for b, n, marked in a.bitmap.runs() if marked]
                await self.copy(M.copies(e, a, back, back=True))  # durable first
                lun, rng = a.lun, (a.offset, a.bitmap.nblocks * P.BLOCK_SIZE)
                faultpoints.hit("movement.abort")
                # the record frees L2 (so a crash never finds marked blocks pointing at
                # a punched L2); it stays reserved, in the same step, until punched
                seq = self._record(MoveAbort(d.name, vstart))
                self.coherence.unpublish(d, vstart)
                with self.placement.reserved([(lun, *rng)]):
                    await self.journal.wait_durable(seq)
                    await self.placement.release_space([(self.state.luns[lun].path, *rng)])
            await self.coherence.push_update(d, e.vstart, e.vend)

    async def run_move(self, d: Disk, vstart: int, pace: Pacer | None = None) -> None:
        """Copy a started move to the end and commit it (one runner per move); pace:
        its job's rate limit (None: as fast as it goes)."""
        key = (d.uid, vstart)
        running = self._move_runners.get(key)
        if running is not None:
            await running.wait()  # someone runs it already: wait for the end
            return
        done = self._move_runners[key] = trio.Event()
        try:
            await self.agents.wait_grace()
            while await self.copy_step(d, vstart, pace):
                pass
            await self._commit_move(d, vstart)
        except MoveGone as e:
            log.info("move ended early: %s", e)
        finally:
            del self._move_runners[key]
            done.set()

    def spawn_move(self, d: Disk, vstart: int) -> None:
        """Run a move in the background; a failure is logged (the move stays, and
        resumes at the next start), never raised into the service's nursery."""
        async def run() -> None:
            try:
                await self.run_move(d, vstart)
            except (P.RemoteError, OSError) as e:
                log.error("move of %s at %d stopped: %s", d.name, vstart,
                          getattr(e, "message", e))
        self.ctx.spawn(run)

    async def copying_done(self, d: Disk, start: int = 0, end: int = P.MAX_DISK_SIZE
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

    # ------------------------------------------------------------ holding moves back
    def may_start(self, d: Disk) -> bool:
        """New moves of d's segments may start now (no snapshot is settling d)."""
        return d.uid not in self._no_new_moves

    @asynccontextmanager
    async def settled(self, d: Disk, wait: float) -> AsyncIterator[None]:
        """For the block, no segment of d is being moved and none starts: a snapshot's
        table must hold each block's current location, and a half-moved segment's
        current data is split between two. Runs d's moves to their end first (hold d's
        writes frozen); RemoteError E_BUSY if they do not end within wait seconds."""
        self._no_new_moves.add(d.uid)
        try:
            with trio.move_on_after(wait):
                while d.alts:
                    for vs in list(d.alts):
                        self.spawn_move(d, vs)
                    await trio.sleep(0.01)
            if d.alts:
                raise P.RemoteError(P.E_BUSY, f"disk {d.name!r} has segments being moved "
                                    "that did not finish in time; retry")
            yield
        finally:
            self._no_new_moves.discard(d.uid)

    # ------------------------------------------------------------ container fail/restore
    def suspect(self, lun: int, note: str) -> None:
        """An agent reported an I/O error on LUN lun (note: when, where, what): the
        container shows as suspect until someone fails or restores it."""
        n, _last = self._suspect.get(lun, (0, None))
        self._suspect[lun] = (n + 1, note)

    def container_dict(self, c: Container) -> dict[str, object]:
        """A container as vdctl shows it: state ok, draining, drained, error (failed) or suspect
        (agents reported I/O errors on it), with the count and the last error."""
        info = c.to_dict()
        s = self._suspect.get(c.lun)
        if s is not None and not c.failed:
            info["state"] = "suspect"
        info["errors"] = s[0] if s else 0
        info["last_error"] = s[1] if s else None
        return info

    async def _push_lun(self, lun: int) -> None:
        """Send fresh entries for everything on LUN lun to the agents that cache it."""
        for d in list(self.state.disks.values()):
            ranges = [(e.vstart, e.vend) for e in d.extents
                      if e.lun == lun or (e.flags & MOVING and d.alts[e.vstart].lun == lun)]
            if ranges:
                await self.coherence.push_update(d, ranges[0][0], ranges[-1][1])

    async def container_fail(self, name: str) -> dict[str, object]:
        """Every entry on the container turns `error` at every agent: I/O there fails
        with EIO at once; other containers, disks and ranges keep working."""
        c = self.ctx.container(name)
        if not c.failed:
            await self.journal.commit(ContainerFail(name))
            await self._push_lun(c.lun)
        self._suspect.pop(c.lun, None)
        return self.container_dict(c)

    async def container_restore(self, name: str) -> dict[str, object]:
        """Clear a failed (or suspect) container: its entries work again, data intact;
        a drained one takes new space again."""
        c = self.ctx.container(name)
        if c.failed or c.drained:
            failed = c.failed
            await self.journal.commit(ContainerRestore(name))
            if failed:
                await self._push_lun(c.lun)
        self._suspect.pop(c.lun, None)
        return self.container_dict(c)
