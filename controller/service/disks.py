"""Disk operations: create, ls, info, map, resize, rm, rename, discard."""

from __future__ import annotations

import time

from .. import protocol as P
from ..recordbase import pieces_of
from ..records import DiskCreate, DiskRename, DiskResize, DiskRm, DiskUnmap, Record
from ..records_attrs import DiskPerms
from ..state import Disk, round_up
from ..units import human, size_range
from .coherence import Coherence
from .context import Caller, Context
from .movement import Movement
from .perms import check_perms
from .placement import Placement
from .snapshots import Snapshots

MAX_MAP_ROWS = 65536


class Disks:
    """The admin's disk operations (and an agent's resize and rm)."""

    def __init__(self, ctx: Context, placement: Placement, coherence: Coherence,
                 movement: Movement, snapshots: Snapshots):
        self.ctx = ctx
        self.state = ctx.state
        self.journal = ctx.journal
        self.agents = ctx.agents
        self._record = ctx.record
        self.placement = placement
        self.coherence = coherence
        self.movement = movement
        self.snapshots = snapshots

    async def disk_create(self, name: str, size: int, thick: bool, segment_size: int | None,
                          container: str | None, uid: int | None = None,
                          gid: int | None = None, mode: int | None = None
                          ) -> dict[str, object]:
        """Create disk name of size bytes (thick: all of it allocated now; segment_size:
        the allocation unit; container: pinned there; uid, gid, mode: its owner, group
        and mode, None: the mount's default, docs/permissions.md). Raises RemoteError
        E_EXISTS, E_INVALID, E_NOT_FOUND, E_NO_SPACE, E_IO."""
        P.check_name(name, "disk name")
        check_perms(uid, gid, mode)
        if name in self.state.disks:
            raise P.RemoteError(P.E_EXISTS, f"disk {name!r} already exists")
        if not 0 <= size <= P.MAX_DISK_SIZE:
            raise P.invalid(f"disk size must be {size_range(0, P.MAX_DISK_SIZE)}")
        seg = P.DEFAULT_SEGMENT_SIZE if segment_size is None else segment_size
        if seg % P.BLOCK_SIZE or not P.MIN_SEGMENT_SIZE <= seg <= P.MAX_SEGMENT_SIZE:
            raise P.invalid(f"segment size must be a multiple of {human(P.BLOCK_SIZE)} "
                            f"{size_range(P.MIN_SEGMENT_SIZE, P.MAX_SEGMENT_SIZE)}")
        if segment_size is not None and 0 < size < seg:
            # a first write would need the whole segment: more space than the disk has
            raise P.invalid(f"segment size {human(seg)} is larger than the disk's size, "
                            f"{human(size)}")
        pin = self.ctx.container(container).lun if container is not None else None
        if pin is not None and self.state.luns[pin].failed:
            raise P.RemoteError(P.E_IO, f"container {container!r} is failed")
        if pin is not None and self.state.luns[pin].drained:
            raise P.invalid(f"container {container!r} is drained; take it back into use "
                            f"first (vdctl container restore {container})")
        cands = self.placement.candidates(pin, None)
        if not cands:
            raise P.RemoteError(P.E_NO_SPACE, "no containers (add one with: vdctl container "
                                "add NAME PATH --size SIZE)")
        home = cands[0].lun
        def create(pieces: list[list[int]]) -> Record:
            if name in self.state.disks:  # created meanwhile (thick zeroing awaits)
                raise P.RemoteError(P.E_EXISTS, f"disk {name!r} already exists")
            return DiskCreate(name, size, seg, thick, pin, home, round(time.time(), 3),
                              pieces_of(pieces))

        if thick and size:
            seq = await self.placement.allocate([(0, size)], pin, home, create, preallocate=True)
        else:
            seq = self._record(create([]))
        if (uid, gid, mode) != (None, None, None):
            # in the same step as the create: no one sees the disk with other perms
            seq = self._record(DiskPerms(name, uid, gid, mode))
        await self.journal.wait_durable(seq)
        await self.agents.notify({"push": "namespace"})
        d = self.state.disks[name]
        return self._warn_overcommit(self.ctx.disk_info(d), d)

    def _warn_overcommit(self, info: dict[str, object], d: Disk) -> dict[str, object]:
        """Add a "warning" to a reply about disk d (created or grown) when the disks
        pinned to d's container promise more than it holds, or thin disks more than the
        pool holds (like LVM thin's "sum of all thin volume sizes exceeds the size of
        thin pool"): a warning, never a refusal. A thin disk promises its size, a
        thick one what it has allocated."""
        def promised(disks: list[Disk]) -> int:
            return sum(t.allocated if t.thick else t.size for t in disks)

        if d.pin is not None:
            c = self.state.luns[d.pin]
            pinned = promised([t for t in self.state.disks.values() if t.pin == d.pin])
            if pinned > c.usable:
                info["warning"] = (
                    f"disks pinned to container {c.name!r} now promise {human(pinned)}, "
                    f"more than its {human(c.usable)}: writes will meet ENOSPC if they "
                    "use it all")
                return info
        total = promised(list(self.state.disks.values()))
        capacity = sum(c.usable for c in self.state.containers.values() if not c.failed)
        if total > capacity:
            info["warning"] = (f"disks now promise {human(total)}, more than the pool's "
                               f"{human(capacity)}: writes will meet ENOSPC if they use it all")
        return info

    async def disk_ls(self, snapshots: bool = False) -> list[dict[str, object]]:
        """Disks by name; with snapshots, their snapshots too (marked "snapshot": the
        mount shows them as read-only files)."""
        tables = [*self.state.disks.values(),
                  *(self.state.snaps.values() if snapshots else ())]
        out = []
        for d in sorted(tables, key=lambda d: d.name):
            info = self.ctx.disk_info(d)
            info["snapshot"] = d.is_snapshot
            out.append(info)
        return out

    async def disk_info(self, name: str) -> dict[str, object]:
        """A disk or a snapshot (NAME@SNAP), the bytes it maps on each container, and
        its snapshots (a snapshot: "snapshot" true, "disk" its disk, no snapshots)."""
        d = self.ctx.table(name)
        info = self.ctx.disk_info(d)
        per: dict[str, int] = {}
        for e in d.extents:
            cname = self.state.luns[e.lun].name
            per[cname] = per.get(cname, 0) + e.length
        info["placement"] = [{"container": k, "bytes": v} for k, v in sorted(per.items())]
        info["snapshots"] = sorted(s.name for s in self.state.snaps.values()
                                   if s.parent == d.name)
        if d.is_snapshot:
            info.update(snapshot=True, disk=d.parent)
        return info

    async def disk_map(self, name: str, start: int, limit: int | None) -> dict[str, object]:
        """Entries (zero gaps included) of a disk or a snapshot (NAME@SNAP) from start,
        at most limit rows per call."""
        d = self.ctx.table(name)
        if not 0 <= start <= d.size:
            raise P.invalid(f"start {start} is outside the disk (size {d.size})")
        lim = MAX_MAP_ROWS if limit is None else limit
        if not 0 < lim <= MAX_MAP_ROWS:
            raise P.invalid(f"limit must be between 1 and {MAX_MAP_ROWS}")
        rows: list[list[int]] = []
        nxt = None
        for e in self.coherence.entries(d, start, d.size):  # as agents see them
            if len(rows) == lim:
                nxt = e.vstart
                break
            rows.append(self.coherence.row(e))
        luns = {str(c.lun): c.name for c in self.state.containers.values()}
        return {"name": d.name, "size": d.size, "epoch": d.epoch, "containers": luns,
                "rows": rows, "next": nxt}

    def _resize_plan(self, d: Disk, size: int, allow_shrink: bool, grow_only: bool
                     ) -> tuple[dict[str, object], list[tuple[str, int, int]]]:
        """What resizing d to size (bytes) does, as disk.resize answers it beside the
        disk's info, and the storage it gives back ((path, offset, length), placement.
        physical). The figures: "old_size" and "size"; "freed", the bytes of storage a
        shrink gives back (what no snapshot or clone shares); "discarded", the byte
        range [new size, old size) a shrink cuts off, else None; "allocated", the
        bytes the disk maps afterwards (a shrink drops what it maps past the new end,
        rounded up to a block; a thick grow maps the new blocks). E_INVALID for a
        shrink without allow_shrink. The real op and its dry run both use it."""
        old = d.size
        if grow_only:
            size = max(size, old)
        if size < old and not allow_shrink:
            raise P.invalid(f"shrinking {d.name!r} from {human(old)} to {human(size)} "
                            "discards data; pass --allow-shrink to do it")
        allocated = d.allocated
        freed: list[tuple[str, int, int]] = []
        if size < old:
            cut = round_up(size)
            freed = self.placement.physical(d, cut, old)
            allocated -= sum(min(e.vend, old) - max(e.vstart, cut)
                             for e in d.extents.stored_in(cut, old))
        elif size > old and d.thick:
            allocated += max(0, size - round_up(old))
        plan: dict[str, object] = {
            "old_size": old, "size": size, "allocated": allocated,
            "freed": sum(n for _path, _off, n in freed),
            "discarded": [size, old] if size < old else None}
        return plan, freed

    async def disk_resize(self, name: str, size: int, allow_shrink: bool,
                          grow_only: bool = False, conn: Caller | None = None,
                          dry_run: bool = False) -> dict[str, object]:
        """Set the disk's size (bytes); an agent caller gets its new entries in "update".
        The answer: the disk's info and _resize_plan's figures (old_size, freed,
        discarded).

        grow_only: make it at least size (a write past the end, fallocate): a disk that
        is already larger stays as it is, so two writers growing it at once (or an
        append racing an ftruncate) both succeed, as on a regular file. Without it, a
        smaller size needs allow_shrink (else E_INVALID). dry_run: check and answer
        the same, "dry_run" true, and change nothing (the info is the disk's now with
        the plan's size and allocated; no overcommit warning).
        """
        d = self.ctx.disk(name)
        if not 0 <= size <= P.MAX_DISK_SIZE:
            raise P.invalid(f"disk size must be {size_range(0, P.MAX_DISK_SIZE)}")
        if dry_run:
            plan, _freed = self._resize_plan(d, size, allow_shrink, grow_only)
            return {**self.ctx.disk_info(d), **plan, "dry_run": True}
        caller = getattr(conn, "agent", None)
        async with self.ctx.dlock(d):
            if self.state.disks.get(d.name) is not d:
                raise P.not_found("disk", name)
            old = d.size
            lo = min(old, size) // P.BLOCK_SIZE * P.BLOCK_SIZE
            plan, _freed = self._resize_plan(d, size, allow_shrink, grow_only)
            size = int(plan["size"])  # type: ignore[call-overload]
            if size == old:
                info = {**self.ctx.disk_info(d), **plan}
                if caller is not None:
                    info["update"] = {"start": lo, "end": d.size,
                                      **await self.coherence.answer(d, lo, d.size)}
                return info
            if size < old:
                await self.movement.copying_done(d, round_up(size), old)
                async with self.coherence.restrict(d, size // P.BLOCK_SIZE * P.BLOCK_SIZE, old,
                                          exclude=None):
                    # planned again: the moves that just ended changed the storage
                    plan, freed = self._resize_plan(d, size, allow_shrink, grow_only)
                    await self.placement.release_space(freed)
                    await self.journal.commit(DiskResize(d.name, size, []))
            else:
                # the bytes past an unaligned old end (inside its last block) may hold
                # data from before a shrink: zero them before they become visible (in a
                # block of its own, if a snapshot or clone shares that one)
                await self.snapshots.unshare_tail(d)
                await self.placement.zero_tail(d)
                start = round_up(old)

                def grow(pieces: list[list[int]]) -> Record:
                    return DiskResize(d.name, size, pieces_of(pieces))

                if d.thick and size > start:
                    seq = await self.placement.allocate([(start, size - start)], d.pin,
                                                        d.home, grow, preallocate=True)
                else:
                    seq = self._record(grow([]))
                await self.journal.wait_durable(seq)
            # the calling agent gets the new entries in the reply, not as a push: a file
            # that grows write by write (cp into the mount) costs one round trip a write
            await self.coherence.push_update(d, lo, d.size, exclude=caller)
        await self.agents.notify({"push": "namespace", "changed": [d.name]}, exclude=caller)
        info = {**self.ctx.disk_info(d), **plan, "allocated": d.allocated}
        if size > old:
            info = self._warn_overcommit(info, d)
        if caller is not None:
            info["update"] = {"start": lo, "end": d.size,
                              **await self.coherence.answer(d, lo, d.size)}
        return info

    def _check_removable(self, d: Disk) -> None:
        snaps = sorted(s.name for s in self.state.snaps.values() if s.parent == d.name)
        if snaps:
            raise P.RemoteError(P.E_BUSY, f"disk {d.name!r} has snapshots: "
                                f"{', '.join(snaps)}; remove them first (vdctl snap rm)")
        users = self.agents.caching(d)
        if users:
            raise P.RemoteError(P.E_BUSY, f"disk {d.name!r} is open on agent(s) "
                                f"{', '.join(a.name for a in users)}; close it there first")

    def _rm_plan(self, d: Disk) -> tuple[dict[str, object], list[tuple[str, int, int]]]:
        """disk.rm's answer for d (its info and "freed": bytes of storage given back,
        what no other table of its family maps) and that storage ((path, offset,
        length), placement.physical). E_BUSY if d may not be removed. The real op and
        its dry run both use it."""
        self._check_removable(d)
        info = self.ctx.disk_info(d)
        freed = self.placement.physical(d, 0, d.size)
        info["freed"] = sum(n for _path, _off, n in freed)
        return info, freed

    async def disk_rm(self, name: str, conn: Caller | None = None, dry_run: bool = False
                      ) -> dict[str, object]:
        """Remove a disk nobody has open and no snapshot refers to; its storage goes
        back to the host. Answers its info and "freed": the bytes of storage given
        back (what no other disk of its family maps: 0 for an untouched clone).
        dry_run: the same checks and answer ("dry_run" true), nothing removed.
        Raises RemoteError E_NOT_FOUND, E_BUSY."""
        d = self.ctx.disk(name)
        if dry_run:
            return {**self._rm_plan(d)[0], "dry_run": True}
        self._check_removable(d)
        await self.agents.wait_grace()
        async with self.ctx.dlock(d):
            if self.state.disks.get(name) is not d:
                raise P.not_found("disk", name)
            self._check_removable(d)
            with self.ctx.removal(d):  # from here on nobody may open it
                await self.movement.copying_done(d)
                info, freed = self._rm_plan(d)
                await self.placement.release_space(freed)
                await self.journal.commit(DiskRm(name))
        self.ctx.forget_lock(d)
        await self.agents.notify({"push": "namespace", "removed": [name]})
        return info

    async def disk_rename(self, name: str, new: str, replace: bool) -> dict[str, object]:
        """Rename a disk (replace: over an existing disk new, which is removed). Raises
        RemoteError E_NOT_FOUND, E_EXISTS, E_INVALID, E_BUSY."""
        d = self.ctx.disk(name)
        P.check_name(new, "new disk name")
        if new == name:
            return self.ctx.disk_info(d)
        target = self.state.disks.get(new)
        if target is not None:
            if not replace:
                raise P.RemoteError(P.E_EXISTS, f"disk {new!r} already exists")
            self._check_removable(target)
            for j in self.state.jobs.values():
                if j.state == "running" and j.disk == new:
                    raise P.RemoteError(P.E_BUSY, f"job {j.id} ({j.kind}) is moving disk "
                                        f"{new!r}; wait for it or abort it")
            await self.agents.wait_grace()
        async with self.ctx.dlocks(d, *([target] if target is not None else [])):
            if self.state.disks.get(name) is not d or self.state.disks.get(new) is not target:
                raise P.RemoteError(P.E_BUSY, "the disks changed meanwhile; retry")
            if target is not None:
                self._check_removable(target)
                with self.ctx.removal(target):
                    await self.movement.copying_done(target)
                    await self.placement.release_space(
                        self.placement.physical(target, 0, target.size))
                    await self.journal.commit(DiskRename(name, new, replace=True))
                self.ctx.forget_lock(target)
            else:
                await self.journal.commit(DiskRename(name, new))
            # "handle": the disk's identity (disk.open's answer), for agents that must
            # match the push to an open that is still on its way
            await self.agents.push_all(self.agents.caching(d),
                                       {"push": "rename", "disk": name, "new": new,
                                        "handle": d.uid})
        await self.agents.notify({"push": "namespace", "removed": [name]})
        return self.ctx.disk_info(d)

    async def disk_discard(self, name: str, offset: int, length: int,
                           conn: Caller | None = None) -> dict[str, object]:
        """Free whole segments in the range; the caller zeroes the partial ends itself."""
        d = self.ctx.disk(name)
        if offset < 0 or length < 0:
            raise P.invalid("discard range must not be negative")
        async with self.ctx.dlock(d):
            if self.state.disks.get(d.name) is not d:
                raise P.not_found("disk", name)
            end = min(offset + length, d.size)
            seg = d.segment_size
            a = min(round_up(offset, seg), end)
            b = end if end == d.size else max(end // seg * seg, a)
            if b > a:
                await self.movement.copying_done(d, a, b)
                async with self.coherence.restrict(d, a, b, exclude=None):
                    freed = self.placement.physical(d, a, b)
                    # unmap whatever is stored there, even when a snapshot or clone
                    # shares all of it (nothing to punch, but the disk must read zeros)
                    if freed or next(iter(d.extents.stored_in(a, b)), None) is not None:
                        await self.placement.release_space(freed)
                        await self.journal.commit(DiskUnmap(d.name, a, b))
                await self.coherence.push_update(d, a, b)
            zero = [[lo, hi] for lo, hi in ((offset, a), (max(b, a), end)) if hi > lo]
            return {"epoch": d.epoch, "v": self.coherence.version,
                    "freed": [a, b] if b > a else None, "zero": zero,
                    "rows": self.coherence.rows(d, a, b) if b > a else []}
