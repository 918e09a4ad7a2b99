"""Where new space goes and how it is prepared: reserve, zero (outside any lock), record.

Planning and reserving happen in one step of the event loop, so two requests
never plan the same space; zeroing then runs in a worker thread while other
requests plan around the reservation; the record takes the space and drops
the reservation in one step again. Nothing is held pool-wide across an await,
so a slow zeroing (BLKZEROOUT of a large thick disk on a device) delays only
its own request.

``place`` is the one path new space takes (reserve, zero, check, record): thin
faults and ``disk.allocate`` (service/faults.py), thick creates and grows
(``allocate``) and the starts of moves (service/movement.py) all go through it.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import trio

from .. import faultpoints, storage
from .. import protocol as P
from ..allocator import FreeSpace, NoSpace
from ..extents import MOVING, ZERO, Extent
from ..records import Record
from ..state import Container, Disk, round_up, unshared_blocks
from ..units import human
from .context import Context

log = logging.getLogger(__name__)


class Placement:
    """New space: plans, reservations while it is zeroed, and space given back.

    Owns the reservations: space planned for requests still zeroing it (LUN ->
    [(offset, length)], bytes); later plans go around it.
    """

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.state = ctx.state
        self._record = ctx.record
        self._reserved: dict[int, list[tuple[int, int]]] = {}

    def candidates(self, d_pin: int | None, home: int | None) -> list[Container]:
        """Containers to allocate from, in order of preference."""
        if d_pin is not None:
            return [self.state.luns[d_pin]]
        usable = [c for c in self.state.containers.values()
                  if not c.failed and not c.draining and not c.drained]
        usable.sort(key=lambda c: (c.lun != home, -c.space.free, c.lun))
        return usable

    def plan(self, targets: list[tuple[int, int]], pin: int | None,
             home: int | None) -> list[list[int]]:
        """Place targets [(vstart, length)] (block-rounded) in one go; NoSpace if short.

        Returns pieces [vstart, length, lun, offset]; only a target that ends at the
        disk's (unaligned) end maps less than its block-rounded storage.
        """
        need = sum(round_up(n) for _v, n in targets)
        cands = self.candidates(pin, home)
        if not cands:
            raise P.RemoteError(P.E_NO_SPACE, "no containers to allocate from "
                                "(add one with: vdctl container add NAME PATH --size SIZE)")
        spaces = {c.lun: self.plannable(c) for c in cands}
        total_free = sum(sp.free for sp in spaces.values())
        if need > total_free:
            where = f"container {cands[0].name!r}" if pin is not None else "the pool"
            raise P.RemoteError(
                P.E_NO_SPACE, f"need {human(need)} but {where} has only {human(total_free)} free")
        phys: list[tuple[int, int, int]] = []  # (lun, offset, length)
        remaining = need
        for c in cands:
            space = spaces[c.lun]
            take = min(remaining, space.free)
            if not take:
                continue
            try:
                phys += [(c.lun, off, n) for off, n in space.plan(take)]
            except NoSpace:
                continue
            remaining -= take
            if not remaining:
                break
        if remaining:
            raise P.RemoteError(P.E_NO_SPACE, f"need {human(need)}; the pool is too fragmented")
        pieces: list[list[int]] = []
        k = 0
        for vstart, length in targets:
            pos, want = vstart, round_up(length)
            while want:
                lun, off, n = phys[k]
                use = min(n, want)
                pieces.append([pos, use, lun, off])
                pos += use
                want -= use
                if use == n:
                    k += 1
                else:
                    phys[k] = (lun, off + use, n - use)
            excess = round_up(length) - length
            if excess:
                pieces[-1][1] -= excess
        return pieces

    def free_for(self, pin: int | None, home: int | None) -> int:
        """Bytes a plan for a disk pinned to pin (a LUN, or None: the pool) could take
        now: the candidates' free space less what requests in flight reserved."""
        return sum(self.plannable(c).free for c in self.candidates(pin, home))

    def fitting_end(self, d: Disk, lo: int, hi: int, least: int) -> int:
        """The end of the longest part [lo, end) of [lo, hi) whose zero entries fit the
        space free for d now (free_for), cut at a segment boundary, but never short of
        lo + least (the part a writer needs: plan then refuses that with E_NO_SPACE).
        Allocation ahead takes what is there instead of refusing a window the pool or
        the pinned container cannot hold (as a file system's delayed allocation does)."""
        seg = d.segment_size
        floor = min(round_up(lo + least, seg), hi)
        budget = self.free_for(d.pin, d.home)
        for e in d.extents.entries(lo, hi):
            if not e.flags & ZERO:
                continue
            need = round_up(e.length)
            if need > budget:
                cut = (e.vstart + budget) // seg * seg
                return max(floor, min(cut, hi), lo)
            budget -= need
        return hi

    def plannable(self, c: Container) -> FreeSpace:
        """c's free space less what requests in flight have reserved on it."""
        reserved = self._reserved.get(c.lun)
        return c.space.without(reserved) if reserved else c.space

    @contextmanager
    def reserved(self, held: list[tuple[int, int, int]]) -> Iterator[None]:
        """Hold held [(lun, offset, length)] (bytes) out of every plan for the block."""
        for lun, off, n in held:
            self._reserved.setdefault(lun, []).append((off, n))
        try:
            yield
        finally:
            for lun, off, n in held:
                lst = self._reserved[lun]
                lst.remove((off, n))
                if not lst:
                    del self._reserved[lun]

    async def allocate(self, targets: list[tuple[int, int]], pin: int | None,
                       home: int | None, make_record: Callable[[list[list[int]]], Record],
                       preallocate: bool = False) -> int:
        """Place, zero and record new storage for targets [(vstart, length)] (bytes).

        make_record(pieces) builds the journal record that maps the pieces
        [vstart, length, lun, offset]; it runs after the zeroing, in the same loop step
        as the record, so it may re-check what the awaits could have changed (and raise
        RemoteError to refuse). Returns the record's seq (not yet durable: wait for it).
        Raises RemoteError E_NO_SPACE (pool or container short), E_IO (zeroing failed).
        """
        pieces = self.plan(targets, pin, home)
        faultpoints.hit("placement.plan")

        def record(pieces: list[list[int]]) -> int:
            faultpoints.hit("placement.record")
            return self._record(make_record(pieces))

        return await self.place(pieces, record, preallocate)

    async def place(self, pieces: list[list[int]], record: Callable[[list[list[int]]], int],
                    preallocate: bool = False, zero: bool = True) -> int:
        """The one path new space takes: reserve pieces [vstart, length, lun, offset]
        (planned in this loop step), zero them outside any lock (preallocate: reserve
        them in the container's file system too; zero=False: not at all, for a move's
        alternate location, which is never read before it is copied: movement.py
        start_move), then record(pieces) in one step with dropping the reservation;
        returns what record returns (a seq).

        Raises RemoteError E_NO_SPACE, E_IO (zeroing failed), E_BUSY (the container
        changed meanwhile), or whatever record raises.
        """
        with self.reserved([(lun, off, round_up(n)) for _v, n, lun, off in pieces]):
            if zero:
                await self._zero(pieces, preallocate)
            self._check_still_free(pieces)
            return record(pieces)

    def _check_still_free(self, pieces: list[list[int]]) -> None:
        for _v, n, lun, off in pieces:
            c = self.state.luns.get(lun)
            if c is None or not c.space.is_free(off, round_up(n)):
                raise P.RemoteError(P.E_BUSY, "the container changed during allocation; retry")

    async def _zero(self, pieces: list[list[int]], preallocate: bool = False) -> None:
        """Zero new space; thick disks also reserve it in the container's own filesystem."""
        by_lun: dict[int, list[tuple[int, int]]] = {}
        for _v, n, lun, off in pieces:
            by_lun.setdefault(lun, []).append((off, round_up(n)))
        for lun, ranges in by_lun.items():
            path = self.state.luns[lun].path
            try:
                faultpoints.hit("placement.zero")
                await trio.to_thread.run_sync(storage.zero_ranges, path, ranges, preallocate,
                                              self.ctx.may_write)
            except OSError as e:
                code = P.E_NO_SPACE if e.errno == errno.ENOSPC else P.E_IO
                raise P.RemoteError(code, f"cannot prepare space on {path}: {e}") from None

    async def zero_tail(self, d: Disk) -> None:
        """Zero d's bytes past its end inside its last block (unaligned size), before
        a grow makes them visible; RemoteError E_IO if that fails."""
        if not d.size % P.BLOCK_SIZE:
            return
        e = d.extents.find(d.size - 1)
        if e is None:
            return
        rel = d.size - e.vstart
        n = round_up(rel) - rel
        where = [(self.state.luns[e.lun].path, e.offset + rel)]
        if e.flags & MOVING:  # the block's data may be at the alternate location: both
            a = d.alts[e.vstart]
            where.append((self.state.luns[a.lun].path, a.offset + rel))
        try:
            for path, off in where:
                await trio.to_thread.run_sync(storage.zero_bytes, path, off, n,
                                              self.ctx.may_write)
        except OSError as err:
            raise P.RemoteError(P.E_IO, f"cannot zero the tail of {d.name!r}: {err}") from None

    def physical(self, d: Disk, start: int, end: int) -> list[tuple[str, int, int]]:
        """(container path, offset, length) of d's storage in [start, end), block-rounded,
        that no other table (snapshot, clone) maps: what freeing the range gives back."""
        out = []
        entries = list(d.extents.entries(start, end))
        mapped = [e for e in entries if not e.flags & ZERO and e.offset % P.BLOCK_SIZE == 0]
        for e, shared in zip(mapped, self.state.referenced_all(d.family, mapped, skip=d),
                             strict=True):
            out += self.unshared(d, e, shared)
        return out + self.alt_physical(d, start, end, entries)

    def alt_physical(self, d: Disk, start: int, end: int,
                     entries: list[Extent] | None = None) -> list[tuple[str, int, int]]:
        """(container path, offset, length) of the alternate locations of d's segments
        being moved in [start, end) (service/movement.py), block-rounded (entries:
        d.extents.entries(start, end), if the caller has them)."""
        out = []
        if entries is None:
            entries = list(d.extents.entries(start, end)) if d.alts else []
        for e in entries:
            if e.flags & MOVING:  # and its alternate location (service/movement.py)
                stored = d.extents.find(e.vstart)
                if stored is not None and stored.vstart in d.alts:
                    a = d.alts[stored.vstart]
                    rel = e.vstart - stored.vstart
                    out.append((self.state.luns[a.lun].path, a.offset + rel,
                                round_up(e.length)))
        return out

    def unshared(self, d: Disk, e: Extent,
                 shared: list[tuple[int, int]] | None = None) -> list[tuple[str, int, int]]:
        """(path, offset, length) of entry e's storage (block-rounded) that no other
        table of d's family maps at the same vstart (shared: what does, if known)."""
        path = self.state.luns[e.lun].path
        if shared is None:
            shared = self.state.referenced(d.family, e.vstart, e.vend, e.lun, e.offset,
                                           skip=d)
        return [(path, off, n) for off, n in unshared_blocks(e, shared)]

    async def release_space(self, freed: list[tuple[str, int, int]]) -> None:
        """Give space about to be freed back to the host (punch holes); best effort.

        Call it *before* recording the free, while no agent may use the range (the disk
        is closed everywhere, or the range restricted): once the free is recorded the
        space may be allocated and written again, and a late punch would destroy that.
        A crash between the punch and the record leaves zeros where data was being
        discarded anyway. A group's deposed leader punches nothing (each punch asks
        ctx.may_write in the thread that makes it): the next leader may have handed
        that space out again.
        """
        by_path: dict[str, list[tuple[int, int]]] = {}
        for path, off, n in freed:
            by_path.setdefault(path, []).append((off, n))
        for path, ranges in by_path.items():
            try:
                await trio.to_thread.run_sync(storage.release_ranges, path, ranges,
                                              self.ctx.may_write)
            except OSError as e:
                log.warning("could not punch freed space in %s: %s", path, e)
