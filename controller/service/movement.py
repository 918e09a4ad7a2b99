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
   agent (draining reads in flight on L1), record ``move.commit``, which frees
   L1, with L1 held reserved until it is durable and punched (copier.py).
5. abort: restrict the segment at every agent (drained), copy marked blocks
   back L2 -> L1, record ``move.abort``, which frees L2.

Steps 1 and 2 are here; 3 to 5 are the copier's (service/copier.py: ``Copier``,
owned by ``Movement`` as ``movement.copier``; the other services call them through
``spawn_move``, ``run_move``, ``abort_move`` and ``copying_done`` here).

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
from typing import TYPE_CHECKING

import trio

from .. import faultpoints, storage
from .. import moves as M
from .. import protocol as P
from ..agents import Agent
from ..extents import MOVING, Extent
from ..moves import MoveGone
from ..records import ContainerFail, ContainerRestore, MoveMark, MoveStart
from ..state import Container, Disk, round_up
from ..tables import Alt
from ..units import human
from .coherence import Coherence
from .context import Context
from .copier import Copier
from .placement import Placement

if TYPE_CHECKING:
    from .copier import Pacer

log = logging.getLogger(__name__)


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
        self._no_new_moves: set[int] = set()
        self._suspect: dict[int, tuple[int, str | None]] = {}
        # steps 3-5 (copier, commit, abort): service/copier.py
        self.copier = Copier(self)

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
        background: in a thread at the copier's low priority (storage.low_priority), on
        the copier's own thread limiter (Copier.threads).
        RemoteError E_IO or E_NO_SPACE (E_IO also when this controller may no longer
        write: the copying thread asks ctx.may_write before each chunk, writegate.gate)."""
        if not cs:
            return
        try:
            faultpoints.hit("movement.copy")
            if background:
                await trio.to_thread.run_sync(storage.low_priority, storage.copy_ranges,
                                              self._paths(cs), self.ctx.may_write, durable,
                                              True, limiter=self.copier.threads)
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
            if self.copier.busy(d, e.vstart, first, last):
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

    # ------------------------------------------------------------ 3-5: the copier
    def spawn_move(self, d: Disk, vstart: int) -> None:
        """Run a move in the background (Copier.spawn_move)."""
        self.copier.spawn_move(d, vstart)

    async def run_move(self, d: Disk, vstart: int, pace: Pacer | None = None) -> None:
        """Copy a started move to the end and commit it (Copier.run_move)."""
        await self.copier.run_move(d, vstart, pace)

    async def abort_move(self, d: Disk, vstart: int) -> None:
        """Roll a move back (Copier.abort_move)."""
        await self.copier.abort_move(d, vstart)

    async def copying_done(self, d: Disk, start: int = 0, end: int = P.MAX_DISK_SIZE
                           ) -> None:
        """Wait until no copier step overlaps [start, end) of d (Copier.copying_done)."""
        await self.copier.copying_done(d, start, end)

    def check_luns(self, d: Disk, e: Extent, a: Alt) -> None:
        """RemoteError E_IO if a container of d's move at e (alternate a) is failed."""
        if self.state.luns[a.lun].failed or self.state.luns[e.lun].failed:
            raise P.RemoteError(P.E_IO, f"disk {d.name!r} at {e.vstart}: a container of "
                                "its move is failed")

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
