"""Snapshots, clones and rollback, with fine-grained copy-on-write (docs/snapshots.md).

A snapshot ``DISK@SNAP`` is a read-only copy of the disk's table, made in
O(extent chunks) (``ExtentMap.clone``); it shares every block with the disk.
Tables of one family (a disk, its snapshots, their clones) share storage only at
the same vstart, so whether a block is shared is a lookup in the family's
tables (``State.referenced``), and a block is freed only when no table of the
family maps it. Shared entries are ``nowrite`` at the agents: the first write
to a shared segment faults, and the segment is copied on write with the move
engine (service/movement.py): it gets new space, the blocks the write touches
are copied there and marked at once, the rest follows in the background, and
the snapshot keeps the old location.
"""

from __future__ import annotations

import logging
import time

import trio.lowlevel

from .. import faultpoints
from .. import moves as M
from .. import protocol as P
from ..extents import MOVING, ZERO
from ..moves import move_units
from ..records import (
    DiskClone,
    MoveCommit,
    MoveMark,
    SnapCreate,
    SnapRm,
    SnapRollback,
    SnapTrim,
)
from ..sharing import own_pieces
from ..state import Disk
from .coherence import Coherence
from .context import Context, split_snap_name
from .movement import MoveGone, Movement
from .placement import Placement

log = logging.getLogger(__name__)

SNAP_WAIT = 30.0  # longest a snapshot waits for moves in flight on its disk
# extents of a snapshot looked up per step of snap rm's plan, between which the loop
# runs (a few ms a step on the 2-core test machines)
RM_STEP = 512
# a snap.trim record drops at most about this many extents of a snapshot being removed
# (whole extent chunks: at most 2 * extents._CHUNK when one chunk is bigger): its apply
# costs ~10 us an extent, so a step holds the loop ~40 ms (the aim: under 100 ms)
TRIM_STEP = 4096


class Snapshots:
    """Snapshots, clones, rollback, and copy-on-write of what they share."""

    def __init__(self, ctx: Context, placement: Placement, coherence: Coherence,
                 movement: Movement):
        self.ctx = ctx
        self.state = ctx.state
        self.journal = ctx.journal
        self.agents = ctx.agents
        self.placement = placement
        self.coherence = coherence
        self.movement = movement

    def _snap_info(self, s: Disk) -> dict[str, object]:
        """A snapshot as vdctl shows it; "held": bytes only it maps (what rm frees)."""
        # extent chunks another table holds as they are hold nothing of s's own
        pieces = own_pieces(s, self.state.family(s.family))
        held = sum(e.length for e in pieces) - sum(
            hi - lo for shared in self.state.referenced_all(s.family, pieces, skip=s)
            for lo, hi in shared)
        clones = sorted(t.name for t in self.state.disks.values() if t.origin == s.name)
        return {"name": s.name, "disk": s.parent, "created": s.ctime, "size": s.size,
                "allocated": s.allocated, "held": held, "clones": clones,
                "removing": s.removing}

    def _not_removing(self, s: Disk) -> None:
        """E_BUSY if snapshot s is being removed (a new table sharing its storage would
        lose what the removal frees), now or since a snap.trim record (R.SnapTrim)."""
        if self.ctx.removing(s) or s.removing:
            raise P.RemoteError(P.E_BUSY, f"snapshot {s.name!r} is being removed")

    # ------------------------------------------------------------ operations
    async def snap_create(self, name: str) -> dict[str, object]:
        """Snapshot DISK@SNAP: writes are held (entries nowrite at every agent, drained
        and acknowledged; reads go on), the table is copied in O(chunks), then writes
        go on with copy-on-write. Raises RemoteError: E_NOT_FOUND, E_EXISTS, E_INVALID,
        E_BUSY (moves that did not settle)."""
        disk, snap = split_snap_name(name)
        d = self.ctx.disk(disk)
        if name in self.state.snaps:
            raise P.RemoteError(P.E_EXISTS, f"snapshot {name!r} already exists")
        # writes frozen, then moves settled, then the disk's lock (let go in reverse)
        async with (self.coherence.freeze(d), self.movement.settled(d, SNAP_WAIT),
                    self.ctx.dlock(d)):
            if self.state.disks.get(disk) is not d:
                raise P.not_found("disk", disk)
            if name in self.state.snaps:
                raise P.RemoteError(P.E_EXISTS, f"snapshot {name!r} already exists")
            faultpoints.hit("snapshot.create")
            await self.journal.commit(SnapCreate(disk, snap, round(time.time(), 3)))
        await self.agents.notify({"push": "namespace"})
        s = self.state.snaps[name]  # shares everything: nothing is its own yet
        return {"name": s.name, "disk": s.parent, "created": s.ctime, "size": s.size,
                "allocated": s.allocated, "held": 0, "clones": []}

    async def snap_ls(self, name: str | None = None) -> list[dict[str, object]]:
        """The snapshots of disk name, oldest first; without a name, every disk's (by
        disk name, then oldest first), as `zfs list -t snapshot` lists them all."""
        parent = self.ctx.disk(name).name if name is not None else None
        return [self._snap_info(s) for s in sorted(self.state.snaps.values(),
                                                   key=lambda s: (s.parent or "", s.ctime,
                                                                  s.name))
                if parent is None or s.parent == parent]

    def _rm_check(self, s: Disk) -> None:
        """E_BUSY if snapshot s has clones or is open at an agent (it cannot go)."""
        clones = sorted(t.name for t in self.state.disks.values() if t.origin == s.name)
        if clones:
            raise P.RemoteError(P.E_BUSY, f"snapshot {s.name!r} has clones: "
                                f"{', '.join(clones)}; remove them first")
        users = self.agents.caching(s)
        if users:
            raise P.RemoteError(P.E_BUSY, f"snapshot {s.name!r} is open on agent(s) "
                                f"{', '.join(a.name for a in users)}; close it there first")

    async def _rm_freed(self, s: Disk) -> list[tuple[str, int, int]]:
        """placement.physical(s, 0, s.size) (exactly what only s maps), in bounded steps:
        the extent chunks another table of the family holds as they are are skipped in
        O(chunks) (ExtentMap.batches: nothing there is s's alone), the rest is looked
        up RM_STEP extents at a time with the loop let go between steps, so removing a
        1 TiB snapshot never stalls heartbeats or other disks' faults for long."""
        out: list[tuple[str, int, int]] = []
        others = [t.extents for t in self.state.family(s.family) if t is not s]
        for batch in s.extents.batches(RM_STEP, others):
            mapped = [e for e in batch if e.vstart < s.size and e.offset % P.BLOCK_SIZE == 0]
            for e, shared in zip(mapped, self.state.referenced_all(s.family, mapped, skip=s),
                                 strict=True):
                out += self.placement.unshared(s, e, shared)
            await trio.lowlevel.checkpoint()
        if s.alts:  # a snapshot's segment being moved: its alternate locations too
            out += self.placement.alt_physical(s, 0, s.size)
        return out

    async def _rm_plan(self, s: Disk) -> tuple[dict[str, object], list[tuple[str, int, int]]]:
        """snap.rm's answer for snapshot s (its info and "held": the bytes of storage
        removing it gives back, exactly what no disk, clone or other snapshot maps)
        and that storage ((path, offset, length), _rm_freed). E_BUSY if s has
        clones or is open. The dry run answers it; the real op sums the same in steps."""
        self._rm_check(s)
        freed = await self._rm_freed(s)
        info: dict[str, object] = {"name": s.name, "disk": s.parent, "created": s.ctime,
                                   "size": s.size, "allocated": s.allocated, "clones": [],
                                   "held": sum(n for _path, _off, n in freed)}
        return info, freed

    async def snap_rm(self, name: str, dry_run: bool = False) -> dict[str, object]:
        """Remove a snapshot; frees exactly what no disk, clone or other snapshot maps.
        Answers _rm_plan's info; dry_run: the same ("dry_run" true), nothing removed.
        Raises RemoteError E_NOT_FOUND, E_BUSY. While it is being removed, clones of it
        and rollbacks to it are refused (E_BUSY): they would share what it frees.

        In steps, so that no record's apply holds the loop for long at any size (issue
        15: under 100 ms): one snap.trim record marks the snapshot removing, for good
        (a crash then leaves it removing, and the next start finishes it: resume_rm),
        then each snap.trim drops about TRIM_STEP of the extents it does not share
        whole with another table (ExtentMap.own_spans), its storage given back first
        (Placement.release_space, as before any free); the snap.rm record drops the
        rest, which is shared as it is, in O(chunks). Another snap.rm of a snapshot
        being removed (this one failed half-way) carries on from where it is."""
        s = self.ctx.snapshot(name)
        if dry_run:
            return {**(await self._rm_plan(s))[0], "dry_run": True}
        self._rm_check(s)
        await self.agents.wait_grace()
        async with self.ctx.dlock(s):
            if self.state.snaps.get(name) is not s:
                raise P.not_found("snapshot", name)
            with self.ctx.removal(s):
                self._rm_check(s)
                # _rm_plan's info, "held" summed from the steps' frees below (what the
                # dry run's one walk finds; no second walk over the table here)
                info: dict[str, object] = {
                    "name": s.name, "disk": s.parent, "created": s.ctime, "size": s.size,
                    "allocated": s.allocated, "clones": []}
                held = 0
                if not s.removing:
                    await self.journal.commit(SnapTrim(name, 0, 0))
                others = [t.extents for t in self.state.family(s.family) if t is not s]
                for lo, hi in s.extents.own_spans(TRIM_STEP, others):
                    freed = self.placement.physical(s, lo, hi)
                    held += sum(n for _path, _off, n in freed)
                    await self.placement.release_space(freed)
                    faultpoints.hit("snapshot.trim")
                    await self.journal.commit(SnapTrim(name, lo, hi))
                # what is left is shared whole (or changed in the family meanwhile)
                freed = await self._rm_freed(s)
                held += sum(n for _path, _off, n in freed)
                await self.placement.release_space(freed)
                await self.journal.commit(SnapRm(name))
                info["held"] = held
        await self.agents.notify({"push": "namespace", "removed": [name]})
        return info

    async def resume_rm(self) -> None:
        """Finish removing every snapshot a snap.trim record marked removing (a
        snap.rm that a crash or an error cut short); errors are logged. The service
        runs it at its start, in the background."""
        for s in [t for t in self.state.snaps.values() if t.removing]:
            log.info("finishing the removal of snapshot %r", s.name)
            try:
                await self.snap_rm(s.name)
            except P.RemoteError as e:
                log.error("snapshot %r: its removal did not finish: %s", s.name, e.message)

    def _rollback_plan(self, s: Disk, d: Disk
                       ) -> tuple[dict[str, object], list[tuple[str, int, int]]]:
        """What rolling disk d back to its snapshot s does, as snap.rollback answers it
        beside d's info: "old_size" and "size" (s's), "allocated" (s's: d's table
        becomes a copy of s's), "freed" (the bytes of storage only d maps now, given
        back), "newer_snapshots" (d's snapshots newer than s, kept as they are, oldest
        first); and that storage ((path, offset, length)). The real op and its dry run
        both use it."""
        # storage only the disk holds now, and the snapshot does not map
        # what only the disk maps goes; what the snapshot (or another
        # table) maps at the same vstart stays: the disk's new table
        freed = [r for e in d.extents if not e.flags & ZERO
                 for r in self.placement.unshared(d, e)]
        # unlike zfs rollback (which must destroy them: -r), the newer snapshots stay
        # whole and usable, as rbd's and LVM's do; say which
        newer = sorted((t for t in self.state.snaps.values()
                        if t.parent == d.name and t.ctime > s.ctime),
                       key=lambda t: (t.ctime, t.name))
        plan: dict[str, object] = {
            "old_size": d.size, "size": s.size, "allocated": s.allocated,
            "freed": sum(n for _path, _off, n in freed),
            "newer_snapshots": [t.name for t in newer]}
        return plan, freed

    async def snap_rollback(self, name: str, force: bool, dry_run: bool = False
                            ) -> dict[str, object]:
        """The disk's content and size become the snapshot's. Refused while the disk is
        open at any agent, unless force (its agents then see the new content at once).
        Snapshots newer than it are kept (the answer's "newer_snapshots" names them).
        Answers the disk's info with _rollback_plan's figures; dry_run: the same checks
        and figures ("dry_run" true; the info is the disk's now), nothing changed."""
        s = self.ctx.snapshot(name)
        assert s.parent is not None
        d = self.ctx.disk(s.parent)
        users = self.agents.caching(d)
        if users and not force:
            raise P.RemoteError(P.E_BUSY, f"disk {d.name!r} is open on agent(s) "
                                f"{', '.join(a.name for a in users)}; close it there, or "
                                "pass --force to roll it back under them")
        if dry_run:
            return {**self.ctx.disk_info(d), **self._rollback_plan(s, d)[0], "dry_run": True}
        old_size = d.size
        async with (self.coherence.restrict(d, 0, P.MAX_DISK_SIZE, exclude=None),
                    self.movement.settled(d, SNAP_WAIT), self.ctx.dlock(d)):
            await self.movement.copying_done(d)
            if self.state.snaps.get(name) is not s or self.state.disks.get(
                    d.name) is not d:
                raise P.RemoteError(P.E_BUSY, "the disk changed meanwhile; retry")
            self._not_removing(s)
            plan, freed = self._rollback_plan(s, d)
            await self.placement.release_space(freed)
            await self.journal.commit(SnapRollback(name))
        await self.coherence.push_update(d, 0, max(old_size, d.size))
        await self.agents.notify({"push": "namespace", "changed": [d.name]})
        return {**self.ctx.disk_info(d), **plan}

    async def disk_clone(self, name: str, new: str) -> dict[str, object]:
        """A writable thin disk NEW from snapshot NAME@SNAP, sharing its storage.
        E_BUSY while the snapshot is being removed (snap_rm)."""
        self._not_removing(self.ctx.snapshot(name))
        P.check_name(new, "clone name")
        if new in self.state.disks:
            raise P.RemoteError(P.E_EXISTS, f"disk {new!r} already exists")
        await self.journal.commit(DiskClone(name, new, round(time.time(), 3)))
        await self.agents.notify({"push": "namespace"})
        return self.ctx.disk_info(self.state.disks[new])

    # ------------------------------------------------------------ copy-on-write
    async def unshare_tail(self, d: Disk) -> None:
        """Give d's last, partial block storage of its own if another table shares it
        (before the controller zeroes its tail past the end). Hold d's lock."""
        if not d.size % P.BLOCK_SIZE or len(self.state.family(d.family)) == 1:
            return
        e = d.extents.find(d.size - 1)
        if e is None or e.flags & MOVING or not self.state.referenced(
                d.family, e.vstart, e.vend, e.lun, e.offset, skip=d):
            return
        tail = d.size // P.BLOCK_SIZE * P.BLOCK_SIZE  # a move starts on a block boundary
        for unit in list(move_units(d, tail, d.size, None)):
            for vs in await self.movement.start_move(d, unit, None, cow=True):
                mv, a = self.movement.move_of(d, vs)
                await self.movement.copy(M.copies(mv, a, [(0, a.bitmap.nblocks)]))
                await self.journal.commit(MoveMark(d.name, vs, [(0, a.bitmap.nblocks)]))
                await self.coherence.push_update(d, mv.vstart, mv.vend, drain=True)
                await self.journal.commit(MoveCommit(d.name, vs))

    async def copy_on_write(self, d: Disk, start: int, end: int) -> None:
        """A write to [start, end) of d meets storage a snapshot or clone shares: give
        each shared segment new space (a move that may stay in its container); the
        write's blocks are then copied and marked by the write fault, the rest in the
        background. Hold d's lock."""
        if d.is_snapshot:
            raise P.RemoteError(P.E_READONLY, f"{d.name!r} is a read-only snapshot")
        if len(self.state.family(d.family)) == 1:
            return
        for e in list(d.extents.stored_in(start, end)):
            if e.flags & MOVING:
                continue
            shared = self.state.referenced(d.family, max(e.vstart, start), min(e.vend, end),
                                           e.lun, e.offset + (max(e.vstart, start) - e.vstart),
                                           skip=d)
            if not shared:
                continue
            # the whole segments the write touches get new space; the write's blocks
            # are copied at once (the fault), the rest in the background
            seg = d.segment_size
            lo, hi = shared[0][0] // seg * seg, -(-shared[-1][1] // seg) * seg
            for unit in list(move_units(d, lo, hi, None)):
                cur = d.extents.find(unit.vstart)
                parts = [] if cur is None or cur.flags & MOVING else self.state.referenced(
                    d.family, unit.vstart, unit.vend, unit.lun, unit.offset, skip=d)
                if not parts:
                    continue
                try:
                    # one commit for move.start and the write's move.mark: the answer
                    # waits for move.start to be durable (Coherence.answer), the mark
                    # goes lazily (Movement.prepare_moving_write; docs/movement.md).
                    # Storage shared all through is nowrite at L1 at every agent already
                    # (the snapshot's freeze, Coherence.entries): move.start changes
                    # nothing they hold, so it is not pushed
                    started = await self.movement.start_move(
                        d, unit, None, cow=True, durable=False,
                        push=not _covers(parts, unit.vstart, unit.vend))
                except MoveGone:
                    continue
                for vs in started:
                    self.movement.spawn_move(d, vs)
        log.debug("copy-on-write of %s [%d, %d)", d.name, start, end)

def _covers(parts: list[tuple[int, int]], lo: int, hi: int) -> bool:
    """Whether the ranges parts (sorted) cover [lo, hi) without a gap."""
    pos = lo
    for a, b in parts:
        if a > pos:
            return False
        pos = max(pos, b)
    return pos >= hi


__all__ = ["Snapshots"]
