"""Where new space goes and how it is prepared: plan under the allocation lock, zero, release."""

from __future__ import annotations

import errno
import logging

import trio

from .. import protocol as P
from .. import storage
from ..allocator import NoSpace
from ..extents import ZERO
from ..state import Container, Disk, round_up
from .base import ServiceBase

log = logging.getLogger(__name__)


class Placement(ServiceBase):
    def _candidates(self, d_pin: int | None, home: int | None) -> list[Container]:
        """Containers to allocate from, in order of preference."""
        if d_pin is not None:
            return [self.state.luns[d_pin]]
        usable = [c for c in self.state.containers.values() if not c.failed]
        usable.sort(key=lambda c: (c.lun != home, -c.space.free, c.lun))
        return usable

    def _plan(self, targets: list[tuple[int, int]], pin: int | None,
              home: int | None) -> list[list[int]]:
        """Place targets [(vstart, length)] (block-rounded) in one go; NoSpace if short.

        Returns pieces [vstart, length, lun, offset]; only a target that ends at the
        disk's (unaligned) end maps less than its block-rounded storage.
        """
        need = sum(round_up(n) for _v, n in targets)
        cands = self._candidates(pin, home)
        if not cands:
            raise P.RemoteError(P.E_NO_SPACE, "no containers to allocate from "
                                "(add one with: vdctl container add NAME PATH --size SIZE)")
        total_free = sum(c.space.free for c in cands)
        if need > total_free:
            where = f"container {cands[0].name!r}" if pin is not None else "the pool"
            raise P.RemoteError(
                P.E_NO_SPACE, f"need {need} bytes but {where} has only {total_free} free")
        phys: list[tuple[int, int, int]] = []  # (lun, offset, length)
        remaining = need
        for c in cands:
            take = min(remaining, c.space.free)
            if not take:
                continue
            try:
                phys += [(c.lun, off, n) for off, n in c.space.plan(take)]
            except NoSpace:
                continue
            remaining -= take
            if not remaining:
                break
        if remaining:
            raise P.RemoteError(P.E_NO_SPACE, f"need {need} bytes; the pool is too fragmented")
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

    async def _plan_zeroed(self, targets: list[tuple[int, int]], pin: int | None,
                           home: int | None, preallocate: bool = False) -> list[list[int]]:
        """Place and zero storage for targets [(vstart, length)]; hold _alloc_lock."""
        pieces = self._plan(targets, pin, home)
        await self._zero(pieces, preallocate)
        self._check_still_free(pieces)
        return pieces

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
                await trio.to_thread.run_sync(storage.zero_ranges, path, ranges, preallocate)
            except OSError as e:
                code = P.E_NO_SPACE if e.errno == errno.ENOSPC else P.E_IO
                raise P.RemoteError(code, f"cannot prepare space on {path}: {e}") from None

    async def _zero_tail(self, d: Disk) -> None:
        if not d.size % P.BLOCK_SIZE:
            return
        e = d.extents.find(d.size - 1)
        if e is None:
            return
        off = e.offset + (d.size - e.vstart)
        n = round_up(d.size - e.vstart) - (d.size - e.vstart)
        path = self.state.luns[e.lun].path
        try:
            await trio.to_thread.run_sync(storage.zero_bytes, path, off, n)
        except OSError as err:
            raise P.RemoteError(P.E_IO, f"cannot zero the tail of {d.name!r}: {err}") from None

    def _physical(self, d: Disk, start: int, end: int) -> list[tuple[str, int, int]]:
        """(container path, offset, length) of d's storage in [start, end), block-rounded."""
        out = []
        for e in d.extents.entries(start, end):
            if not e.flags & ZERO and e.offset % P.BLOCK_SIZE == 0:
                out.append((self.state.luns[e.lun].path, e.offset, round_up(e.length)))
        return out

    async def _release_space(self, freed: list[tuple[str, int, int]]) -> None:
        """Give space about to be freed back to the host (punch holes); best effort.

        Call it *before* recording the free, while no agent may use the range (the disk
        is closed everywhere, or the range restricted): once the free is recorded the
        space may be allocated and written again, and a late punch would destroy that.
        A crash between the punch and the record leaves zeros where data was being
        discarded anyway.
        """
        by_path: dict[str, list[tuple[int, int]]] = {}
        for path, off, n in freed:
            by_path.setdefault(path, []).append((off, n))
        for path, ranges in by_path.items():
            try:
                await trio.to_thread.run_sync(storage.release_ranges, path, ranges)
            except OSError as e:
                log.warning("could not punch freed space in %s: %s", path, e)
