"""The copier: a move's background copy, its commit and its abort (docs/movement.md).

Steps 3 to 5 of a segment's move: the list of all five steps is in
service/movement.py's docstring, which does steps 1 and 2.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from .. import faultpoints, storage
from .. import moves as M
from .. import protocol as P
from ..moves import MoveGone
from ..records import MoveAbort, MoveCommit, MoveMark
from ..state import Disk

if TYPE_CHECKING:
    from .movement import Movement

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


@dataclass
class _Copying:
    """Blocks of one move that the copier is copying right now (write faults wait)."""

    first: int
    count: int
    done: trio.Event = field(default_factory=trio.Event)


class Copier:
    """The background side of moves: the copier's steps in progress (by (disk uid, move
    vstart); write faults on their blocks wait), the moves that have a runner, and the
    bytes published. Owned by Movement (movement.copier), whose lookups and copies it
    uses."""

    def __init__(self, movement: Movement):
        self.movement = movement
        self.ctx = movement.ctx
        self.state = movement.state
        self.journal = movement.journal
        self.agents = movement.agents
        self._record = movement.ctx.record
        self.placement = movement.placement
        self.coherence = movement.coherence
        self._copying: dict[tuple[int, int], _Copying] = {}
        self._move_runners: dict[tuple[int, int], trio.Event] = {}
        self.published_bytes = 0  # bytes the copier published (a counter, volatile)
        # batches copying or flushing at once, over every move of this controller
        # (moves.COPY_CONCURRENT): the rest queue, holding nothing a write fault waits for
        self.batches = trio.CapacityLimiter(M.COPY_CONCURRENT)
        # the copier's worker threads (copies, flushes): a limiter of their own, never
        # trio's default one, which write faults' copies, placement's zeroing and the
        # journal's commits share (a flood of copier threads made them queue)
        self.threads = trio.CapacityLimiter(M.COPY_CONCURRENT + 1)

    def busy(self, d: Disk, vstart: int, first: int, last: int) -> bool:
        """Whether a copier step of d's move at vstart holds any of blocks [first, last)
        (a write fault there must wait for it: copying_done)."""
        c = self._copying.get((d.uid, vstart))
        return c is not None and c.first < last and first < c.first + c.count

    # ------------------------------------------------------------ 3. copier
    async def copy_step(self, d: Disk, vstart: int, pace: Pacer | None = None) -> bool:
        """Copy, make durable and mark the next batch of unmarked blocks, then publish
        them; False when none is left.

        A batch is up to moves.COPY_BATCH_BLOCKS blocks (or what is copied in
        moves.COPY_BATCH_SECONDS), copied in steps of
        moves.COPY_CHUNK_BLOCKS (write faults on a step's blocks wait for it; each step
        is paced by pace, at the copier's low priority), then made durable with one
        flush (_settle), marked in one record, and published (_publish). The copy and
        the flush wait their turn among every move's (Copier.batches: at most
        moves.COPY_CONCURRENT at once); the mark and the publish do not."""
        await faultpoints.hit_async("movement.copier")  # tests hold moves half done here
        async with self.batches:  # (a queued batch holds no blocks: faults do not wait)
            runs = await self._copy_batch(d, vstart, pace)
        if runs is None:
            return True  # write faults marked every block of the batch themselves
        if not runs:
            return False
        async with self.ctx.dlock(d):
            e, a = self.movement.move_of(d, vstart)
            n = a.bitmap.nblocks  # a shrink may cut the batch
            runs = [(b, min(c, n - b)) for b, c in runs if b < n]
            if not runs:
                return True
            faultpoints.hit("movement.mark")
            seq = self._record(MoveMark(d.name, vstart, runs))
        await self.journal.wait_durable(seq)
        await self._publish(d, vstart, runs)
        return True

    async def _copy_batch(self, d: Disk, vstart: int, pace: Pacer | None
                          ) -> list[tuple[int, int]] | None:
        """copy_step's I/O: copy the next batch step by step and flush it once; the runs
        copied ([] if none was left), or None if write faults marked them all meanwhile
        (nothing left to flush or mark)."""
        runs: list[tuple[int, int]] = []
        total = pos = 0
        until = trio.current_time() + M.COPY_BATCH_SECONDS
        while total < M.COPY_BATCH_BLOCKS and (not runs or trio.current_time() < until):
            async with self.ctx.dlock(d):
                e, a = self.movement.move_of(d, vstart)
                self.movement.check_luns(d, e, a)
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
                await self.movement.copy(cs, durable=False, background=True)
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
            return []
        if not await self._settle(d, vstart, runs):
            return None
        return runs

    async def _settle(self, d: Disk, vstart: int, runs: list[tuple[int, int]]) -> bool:
        """Make the copies of runs (copied with durable=False) durable with one flush:
        storage.settle_held, whose settling write rewrites a block of the batch that
        is still unmarked, held like a copy step meanwhile (so no write can land there:
        an unmarked block is written by nobody, and a fault on it waits). False if every
        block of runs is marked already (write faults copied and marked them: nothing
        left to settle or mark)."""
        async with self.ctx.dlock(d):
            e, a = self.movement.move_of(d, vstart)
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
                                          ranges, at, self.ctx.may_write,
                                          limiter=self.threads)
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
        when the move is wholly marked: its commit pushes plain L2 entries next.

        Neither push holds d's lock (a write fault on d does not wait for an agent's
        round trip): the runs are marked durably, and a mark is never undone while its
        move lasts, so every entry any agent gets for them from now on is at L2; the
        drained push retires the older ones. Only the publish itself, a change in
        memory, happens under the lock, and only if the move is still the same one."""
        async with self.ctx.dlock(d):
            try:
                e, a = self.movement.move_of(d, vstart)
            except MoveGone:
                return
            if a.bitmap.all_set():
                return
            lo = e.vstart + min(b for b, _ in runs) * P.BLOCK_SIZE
            hi = min(e.vend, e.vstart + max(b + c for b, c in runs) * P.BLOCK_SIZE)
        faultpoints.hit("movement.publish")
        await self.coherence.push_update(d, lo, hi, drain=True)
        async with self.ctx.dlock(d):
            try:
                e, a2 = self.movement.move_of(d, vstart)
            except MoveGone:
                return
            if a2 is not a:
                return  # another move at vstart since: it publishes its own
            self.published_bytes += self.coherence.publish(d, vstart, a, runs)
        await self.coherence.push_update(d, lo, hi)

    # ------------------------------------------------------------ 4. commit / 5. abort
    async def _commit_move(self, d: Disk, vstart: int) -> None:
        """Commit d's move at vstart, every block marked: every agent drops reads in
        flight on L1 (a drained push of the entries, all at L2 already), then
        ``move.commit`` is recorded (it frees L1) with L1 held reserved, and once it is
        durable L1 is punched and the reservation dropped; last, the plain L2 entries
        are pushed. MoveGone if blocks are left to copy or the move is gone.

        d's lock is held only to check and record (docs/movement.md, "Commit"): the
        drained push needs no lock, since once every block is marked no agent gets an
        entry at L1 for the move (marks are never undone while it lasts; the record
        checks it is the same move, still wholly marked); the wait for the commit to be
        durable and the punch need none, since L1 stays reserved (no plan hands it out)
        until it is punched, and every answer waits for the commit to be durable
        (Coherence.answer)."""
        async with self.ctx.dlock(d):
            e, a = self.movement.move_of(d, vstart)
            if not a.bitmap.all_set():
                raise MoveGone(f"disk {d.name!r} at {vstart}: blocks left to copy")
        # every entry there is at L2 already: make every agent drop reads in flight
        # on L1 before L1 may be reused
        await self.coherence.push_update(d, e.vstart, e.vend, drain=True)
        async with self.ctx.dlock(d):
            e, a2 = self.movement.move_of(d, vstart)
            if a2 is not a or not a.bitmap.all_set():
                raise MoveGone(f"disk {d.name!r} at {vstart}: the move changed")
            # L1 goes back to the host, but for what a snapshot or clone still maps
            freed = self.placement.unshared(d, e)
            faultpoints.hit("movement.commit")
            seq = self._record(MoveCommit(d.name, vstart))
            self.coherence.unpublish(d, vstart)
        with self.placement.reserved([(e.lun, off, n) for _p, off, n in freed]):
            await self.journal.wait_durable(seq)
            await self.coherence.push_update(d, e.vstart, e.vend)
            faultpoints.hit("movement.punch")
            await self.placement.release_space(freed)

    async def abort_move(self, d: Disk, vstart: int) -> None:
        """Roll a move back: its blocks marked at L2 return to L1; L2 is freed."""
        async with self.ctx.dlock(d):
            e, a = self.movement.move_of(d, vstart)
            await self.copying_done(d, e.vstart, e.vend)
            async with self.coherence.restrict(d, e.vstart, e.vend, exclude=None):
                e, a = self.movement.move_of(d, vstart)
                back = [(b, n) for b, n, marked in a.bitmap.runs() if marked]
                await self.movement.copy(M.copies(e, a, back, back=True))  # durable first
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



__all__ = ["Copier", "Pacer"]
