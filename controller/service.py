"""One method per operation: validate, plan, record through the journal, reply.

Planning and ``journal.record`` happen in one step of the event loop (no
await between them), so concurrent requests never plan against a stale
table; the reply waits for the group commit.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from . import protocol as P
from . import storage
from .agents import DEFAULT_LEASE, Agent, AgentRegistry
from .allocator import NoSpace
from .extents import INVALID, ZERO, Extent
from .journal import Journal
from .state import Container, Disk, State, StateError, check, round_up

log = logging.getLogger(__name__)

VERSION = "0.1.0"
MAX_MAP_ROWS = 65536


_NO_LOCK = contextlib.nullcontext()
FAULT_WAIT = 30.0  # longest a fault waits for a restriction on its range to lift


class Service:
    def __init__(self, state: State, journal: Journal, state_dir: str, *,
                 lease: float = DEFAULT_LEASE):
        self.state = state
        self.journal = journal
        self.state_dir = state_dir
        self.started = time.time()
        self.agents = AgentRegistry(lease, os.path.join(state_dir, "agents.live"))
        # one planner at a time: plan -> zero the space -> record, with awaits between
        self._alloc_lock = trio.Lock()
        # ranges whose entries are being restricted at agents before a change (disk -> ranges)
        # restricted ranges per disk, keyed by id(Disk) so a rename cannot orphan them
        self._restricted: dict[int, list[tuple[int, int]]] = {}
        # disks being removed (id): no new opens, tables or faults for them
        self._removing: set[int] = set()
        self._restriction_lifted = trio.Event()
        # resize, discard, rename-over, rm and fault allocation of one disk, one at a time
        self._disk_locks: dict[int, trio.Lock] = {}
        # stamps every table answer and push ("v"), so an agent can tell an answer that was
        # overtaken by a later change (it then faults again instead of using it). Starts at
        # the clock so it keeps growing across controller restarts.
        self.version = time.time_ns() // 1000

    # ------------------------------------------------------------ helpers
    def _container(self, name: str) -> Container:
        c = self.state.containers.get(name)
        if c is None:
            raise P.not_found("container", name)
        return c

    def _disk(self, name: str) -> Disk:
        d = self.state.disks.get(name)
        if d is None:
            raise P.not_found("disk", name)
        return d

    def _disk_info(self, d: Disk) -> dict[str, Any]:
        return d.to_dict(self.state.luns)

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

    # ------------------------------------------------------------ status
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

    # ------------------------------------------------------------ containers
    async def container_add(self, name: str, path: str, size: int | None) -> dict[str, Any]:
        P.check_name(name, "container name")
        if name in self.state.containers:
            raise P.RemoteError(P.E_EXISTS, f"container {name!r} already exists")
        storage.check_container_path(path)
        if size is not None and size < 4096:
            raise P.invalid("container size must be at least 4096 bytes")
        taken = {c.path: c.name for c in self.state.containers.values()}
        csize, created = await trio.to_thread.run_sync(storage.open_container_path, path, size,
                                                        taken)
        # re-check after the await: another request may have taken the name or the path
        clash = name in self.state.containers or any(
            c.path == path for c in self.state.containers.values())
        if clash:
            if created:
                os.unlink(path)
            raise P.RemoteError(P.E_EXISTS, f"container {name!r} or path {path!r} was "
                                "added meanwhile")
        lun = self.state.next_lun
        await self.journal.commit({"op": "container.add", "name": name, "lun": lun,
                                   "path": path, "size": csize, "created": created})
        return self.state.containers[name].to_dict()

    async def container_ls(self) -> list[dict[str, Any]]:
        return [c.to_dict() for c in sorted(self.state.containers.values(), key=lambda c: c.lun)]

    async def container_info(self, name: str) -> dict[str, Any]:
        c = self._container(name)
        info = c.to_dict()
        disks: dict[str, int] = {}
        for d, e in self.state.lun_users(c.lun):
            disks[d.name] = disks.get(d.name, 0) + e.length
        info["disks"] = [{"name": k, "bytes": v} for k, v in sorted(disks.items())]
        info["free_ranges"] = len(c.space)
        return info

    async def container_rm(self, name: str) -> dict[str, Any]:
        c = self._container(name)
        if c.used:
            users = sorted({d.name for d, _ in self.state.lun_users(c.lun)})
            raise P.RemoteError(
                P.E_BUSY, f"container {name!r} holds {c.used} bytes of data (disks: "
                f"{', '.join(users) or '-'}); remove or move them first")
        for d in self.state.disks.values():
            if d.pin == c.lun:
                raise P.RemoteError(P.E_BUSY, f"disk {d.name!r} is pinned to container {name!r}")
        info = c.to_dict()
        await self.journal.commit({"op": "container.rm", "name": name})
        return info

    # ------------------------------------------------------------ disks
    async def disk_create(self, name: str, size: int, thick: bool, segment_size: int | None,
                          container: str | None) -> dict[str, Any]:
        P.check_name(name, "disk name")
        if name in self.state.disks:
            raise P.RemoteError(P.E_EXISTS, f"disk {name!r} already exists")
        if not 0 <= size <= P.MAX_DISK_SIZE:
            raise P.invalid(f"disk size must be between 0 and {P.MAX_DISK_SIZE} bytes")
        seg = P.DEFAULT_SEGMENT_SIZE if segment_size is None else segment_size
        if seg % P.BLOCK_SIZE or not P.MIN_SEGMENT_SIZE <= seg <= P.MAX_SEGMENT_SIZE:
            raise P.invalid(f"segment size must be a multiple of {P.BLOCK_SIZE} between "
                            f"{P.MIN_SEGMENT_SIZE} and {P.MAX_SEGMENT_SIZE} bytes")
        pin = self._container(container).lun if container is not None else None
        if pin is not None and self.state.luns[pin].failed:
            raise P.RemoteError(P.E_IO, f"container {container!r} is failed")
        cands = self._candidates(pin, None)
        if not cands:
            raise P.RemoteError(P.E_NO_SPACE, "no containers (add one with: vdctl container "
                                "add NAME PATH --size SIZE)")
        home = cands[0].lun
        async with self._alloc_lock if thick and size else _NO_LOCK:
            pieces = (await self._plan_zeroed([(0, size)], pin, home, preallocate=True)
                      if thick and size else [])
            if name in self.state.disks:
                raise P.RemoteError(P.E_EXISTS, f"disk {name!r} already exists")
            seq = self._record({
                "op": "disk.create", "name": name, "size": size, "segment_size": seg,
                "thick": thick, "pin": pin, "home": home, "ctime": round(time.time(), 3),
                "map": pieces,
            })
        await self.journal.wait_durable(seq)
        await self.agents.notify({"push": "namespace"})
        return self._disk_info(self.state.disks[name])

    async def disk_ls(self) -> list[dict[str, Any]]:
        return [self._disk_info(d) for d in sorted(self.state.disks.values(),
                                                   key=lambda d: d.name)]

    async def disk_info(self, name: str) -> dict[str, Any]:
        d = self._disk(name)
        info = self._disk_info(d)
        per: dict[str, int] = {}
        for e in d.extents:
            cname = self.state.luns[e.lun].name
            per[cname] = per.get(cname, 0) + e.length
        info["placement"] = [{"container": k, "bytes": v} for k, v in sorted(per.items())]
        return info

    def _row(self, e: Extent) -> list[int]:
        return [e.vstart, e.length, e.lun, e.offset, e.flags]

    async def disk_map(self, name: str, start: int, limit: int | None) -> dict[str, Any]:
        """Entries (zero gaps included) from start, at most limit rows per call."""
        d = self._disk(name)
        if not 0 <= start <= d.size:
            raise P.invalid(f"start {start} is outside the disk (size {d.size})")
        lim = MAX_MAP_ROWS if limit is None else limit
        if not 0 < lim <= MAX_MAP_ROWS:
            raise P.invalid(f"limit must be between 1 and {MAX_MAP_ROWS}")
        rows: list[list[int]] = []
        nxt = None
        for e in d.extents.entries(start, d.size):
            if len(rows) == lim:
                nxt = e.vstart
                break
            rows.append(self._row(e))
        luns = {str(c.lun): c.name for c in self.state.containers.values()}
        return {"name": d.name, "size": d.size, "epoch": d.epoch, "containers": luns,
                "rows": rows, "next": nxt}

    def _dlock(self, d: Disk) -> trio.Lock:
        lk = self._disk_locks.get(id(d))
        if lk is None:
            lk = self._disk_locks[id(d)] = trio.Lock()
        return lk

    def _bump(self) -> int:
        self.version += 1
        return self.version

    async def disk_resize(self, name: str, size: int, allow_shrink: bool,
                          conn: Any = None) -> dict[str, Any]:
        d = self._disk(name)
        if not 0 <= size <= P.MAX_DISK_SIZE:
            raise P.invalid(f"disk size must be between 0 and {P.MAX_DISK_SIZE} bytes")
        async with self._dlock(d):
            if self.state.disks.get(d.name) is not d:
                raise P.not_found("disk", name)
            old = d.size
            if size < old and not allow_shrink:
                raise P.invalid(f"shrinking {name!r} from {old} to {size} bytes discards data; "
                                "pass --allow-shrink to do it")
            if size == old:
                return self._disk_info(d)
            if size < old:
                async with self._restrict(d, size // P.BLOCK_SIZE * P.BLOCK_SIZE, old,
                                          exclude=None):
                    await self._release_space(self._physical(d, round_up(size), old))
                    await self.journal.commit({"op": "disk.resize", "name": d.name,
                                               "size": size, "map": []})
            else:
                async with self._alloc_lock:
                    # the bytes past an unaligned old end (inside its last block) may hold
                    # data from before a shrink: zero them before they become visible
                    await self._zero_tail(d)
                    pieces: list[list[int]] = []
                    start = round_up(old)
                    if d.thick and size > start:
                        pieces = await self._plan_zeroed([(start, size - start)], d.pin, d.home,
                                                         preallocate=True)
                    seq = self._record({"op": "disk.resize", "name": d.name, "size": size,
                                        "map": pieces})
                await self.journal.wait_durable(seq)
            lo = min(old, size) // P.BLOCK_SIZE * P.BLOCK_SIZE
            caller = getattr(conn, "agent", None)
            # the calling agent gets the new entries in the reply, not as a push: a file
            # that grows write by write (cp into the mount) costs one round trip a write
            await self._push_update(d, lo, d.size, exclude=caller)
        await self.agents.notify({"push": "namespace", "changed": [d.name]}, exclude=caller)
        info = self._disk_info(d)
        if caller is not None:
            info["update"] = {"start": lo, "end": d.size, **await self._answer(d, lo, d.size)}
        return info

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

    def _check_removable(self, name: str) -> None:
        users = self.agents.caching(name)
        if users:
            raise P.RemoteError(P.E_BUSY, f"disk {name!r} is open on agent(s) "
                                f"{', '.join(a.name for a in users)}; close it there first")

    async def disk_rm(self, name: str, conn: Any = None) -> dict[str, Any]:
        d = self._disk(name)
        self._check_removable(name)
        await self.agents.wait_grace()
        async with self._dlock(d):
            if self.state.disks.get(name) is not d:
                raise P.not_found("disk", name)
            self._check_removable(name)
            info = self._disk_info(d)
            self._removing.add(id(d))  # from here on nobody may open it
            try:
                await self._release_space(self._physical(d, 0, d.size))
                await self.journal.commit({"op": "disk.rm", "name": name})
            finally:
                self._removing.discard(id(d))
        self._disk_locks.pop(id(d), None)
        await self.agents.notify({"push": "namespace", "removed": [name]})
        return info

    @asynccontextmanager
    async def _dlocks(self, *disks: Disk) -> AsyncIterator[None]:
        """Several disk locks, always taken in the same order (no AB/BA deadlock)."""
        async with contextlib.AsyncExitStack() as stack:
            for d in sorted({id(x): x for x in disks}.values(), key=id):
                await stack.enter_async_context(self._dlock(d))
            yield

    async def disk_rename(self, name: str, new: str, replace: bool) -> dict[str, Any]:
        d = self._disk(name)
        P.check_name(new, "new disk name")
        if new == name:
            return self._disk_info(d)
        target = self.state.disks.get(new)
        if target is not None:
            if not replace:
                raise P.RemoteError(P.E_EXISTS, f"disk {new!r} already exists")
            self._check_removable(new)
            await self.agents.wait_grace()
        async with self._dlocks(d, *([target] if target is not None else [])):
            if self.state.disks.get(name) is not d or self.state.disks.get(new) is not target:
                raise P.RemoteError(P.E_BUSY, "the disks changed meanwhile; retry")
            if target is not None:
                self._check_removable(new)
                self._removing.add(id(target))
                try:
                    await self._release_space(self._physical(target, 0, target.size))
                    await self.journal.commit({"op": "disk.rename", "name": name, "new": new,
                                               "replace": True})
                finally:
                    self._removing.discard(id(target))
                self._disk_locks.pop(id(target), None)
            else:
                await self.journal.commit({"op": "disk.rename", "name": name, "new": new})
            self.agents.rename(name, new)
            await self.agents.push_all(self.agents.caching(new),
                                       {"push": "rename", "disk": name, "new": new})
        await self.agents.notify({"push": "namespace", "removed": [name]})
        return self._disk_info(d)

    async def disk_discard(self, name: str, offset: int, length: int,
                           conn: Any = None) -> dict[str, Any]:
        """Free whole segments in the range; the caller zeroes the partial ends itself."""
        d = self._disk(name)
        if offset < 0 or length < 0:
            raise P.invalid("discard range must not be negative")
        async with self._dlock(d):
            if self.state.disks.get(d.name) is not d:
                raise P.not_found("disk", name)
            end = min(offset + length, d.size)
            seg = d.segment_size
            a = min(round_up(offset, seg), end)
            b = end if end == d.size else max(end // seg * seg, a)
            if b > a:
                async with self._restrict(d, a, b, exclude=None):
                    freed = self._physical(d, a, b)
                    if freed:
                        await self._release_space(freed)
                        await self.journal.commit({"op": "disk.unmap", "name": d.name,
                                                   "start": a, "end": b})
                await self._push_update(d, a, b)
            zero = [[lo, hi] for lo, hi in ((offset, a), (max(b, a), end)) if hi > lo]
            return {"epoch": d.epoch, "v": self.version, "freed": [a, b] if b > a else None,
                    "zero": zero, "rows": self._rows(d, a, b) if b > a else []}

    # ------------------------------------------------------------ agents
    def _agent(self, conn: Any) -> Agent:
        a = getattr(conn, "agent", None)
        if a is None:
            raise P.RemoteError(P.E_PROTOCOL, "register first (agent.register)")
        return a

    async def agent_register(self, name: str, host: str, mount: str, conn: Any) -> dict[str, Any]:
        if conn.agent is not None:
            raise P.RemoteError(P.E_PROTOCOL, "already registered")

        async def send(msg: dict[str, Any]) -> None:
            await conn.send(msg)
            if conn.closed:
                raise ConnectionError("connection closed")

        await trio.to_thread.run_sync(self.agents.mark)
        agent = self.agents.register(name, host, mount, send, kick=conn.abort)
        conn.agent = agent
        conn.on_close.append(lambda: self.agents.disconnected(agent))
        return {"agent_id": agent.id, "lease": self.agents.lease}

    async def agent_heartbeat(self, conn: Any) -> dict[str, Any]:
        a = self._agent(conn)
        self.agents.renew(a)
        epochs = {}
        for name in a.opens:
            d = self.state.disks.get(name)
            epochs[name] = d.epoch if d is not None else None
        return {"lease": self.agents.lease, "epochs": epochs}

    async def agent_bye(self, conn: Any) -> None:
        """A clean agent exit: it uses no entry any more, so its lease need not be waited out."""
        a = self._agent(conn)
        self.agents.remove(a)
        conn.agent = None

    async def agent_ack(self, pid: int) -> bool:
        return self.agents.ack(pid)

    async def agent_ls(self) -> list[dict[str, Any]]:
        return self.agents.to_list()

    async def io_error(self, name: str, lun: int, offset: int, message: str) -> None:
        c = self.state.luns.get(lun)
        log.error("agent reports an I/O error on disk %r, container %s at %d: %s",
                  name, c.name if c else lun, offset, message)

    def _rows(self, d: Disk, start: int, end: int) -> list[list[int]]:
        """Entries for [start, end) as the agent gets them: restricted ranges are invalid."""
        restricted = self._restricted.get(id(d), [])
        rows = []
        for e in d.extents.entries(start, end):
            flags = e.flags
            if any(lo < e.vend and e.vstart < hi for lo, hi in restricted):
                # split so only the restricted part turns invalid
                cuts = sorted({e.vstart, e.vend, *(x for r in restricted for x in r
                                                   if e.vstart < x < e.vend)})
                for lo, hi in zip(cuts, cuts[1:], strict=False):
                    inside = any(rlo <= lo and hi <= rhi for rlo, rhi in restricted)
                    off = e.offset + (lo - e.vstart) if not flags & ZERO else 0
                    rows.append([lo, hi - lo, e.lun, off, flags | (INVALID if inside else 0)])
                continue
            rows.append([e.vstart, e.length, e.lun, e.offset, flags])
        return rows

    def _table(self, d: Disk) -> dict[str, Any]:
        return {
            "name": d.name, "size": d.size, "epoch": d.epoch, "segment_size": d.segment_size,
            "containers": {str(c.lun): c.path for c in self.state.containers.values()},
            "failed": [c.lun for c in self.state.containers.values() if c.failed],
            "v": self.version,
        }

    def _live_disk(self, name: str) -> Disk:
        d = self._disk(name)
        if id(d) in self._removing:
            raise P.not_found("disk", name)
        return d

    async def _answer(self, d: Disk, start: int, end: int) -> dict[str, Any]:
        """Entries for an agent, never more permissive than what is durable."""
        # a mapping recorded by another request is visible in memory before its group
        # commit: wait until everything recorded so far is on disk, then answer
        await self.journal.wait_durable(self.state.seq)
        out = self._table(d)
        out["rows"] = self._rows(d, start, min(end, d.size))
        return out

    async def disk_open(self, name: str, conn: Any) -> dict[str, Any]:
        a = self._agent(conn)
        d = self._live_disk(name)
        a.opens[d.name] = a.opens.get(d.name, 0) + 1
        try:
            out = await self._answer(d, 0, d.size)
            self._live_disk(d.name)
        except BaseException:
            a.opens[d.name] -= 1
            if not a.opens[d.name]:
                del a.opens[d.name]
            raise
        return out

    async def disk_table(self, name: str, conn: Any) -> dict[str, Any]:
        """A fresh copy of a disk's table for an agent that already has it open."""
        self._agent(conn)
        d = self._live_disk(name)
        return await self._answer(d, 0, d.size)

    async def disk_close(self, name: str, conn: Any) -> None:
        a = self._agent(conn)
        n = a.opens.get(name, 0)
        if n <= 1:
            a.opens.pop(name, None)
        else:
            a.opens[name] = n - 1

    def _is_restricted(self, d: Disk, start: int, end: int) -> bool:
        return any(lo < end and start < hi for lo, hi in self._restricted.get(id(d), []))

    async def disk_fault(self, name: str, offset: int, length: int, write: bool,
                         conn: Any) -> dict[str, Any]:
        """An agent lacks a usable entry: allocate (writes to zero ranges) and answer entries."""
        self._agent(conn)
        d = self._live_disk(name)
        if offset < 0 or length <= 0 or offset >= d.size:
            raise P.invalid(f"fault range {offset}+{length} is outside disk {name!r} "
                            f"(size {d.size})")
        with trio.move_on_after(FAULT_WAIT):
            while self._is_restricted(d, offset, offset + length):
                await self._restriction_lifted.wait()
        if self._is_restricted(d, offset, offset + length):
            raise P.RemoteError(P.E_BUSY, f"{name!r} at {offset} is being changed; retry")
        seg = d.segment_size
        lo = offset // seg * seg
        if write:
            async with self._dlock(d):
                if self.state.disks.get(d.name) is not d:
                    raise P.not_found("disk", name)
                hi = min(round_up(offset + length, seg), d.size)
                gaps = [(e.vstart, e.length) for e in d.extents.entries(lo, hi)
                        if e.flags & ZERO]
                if gaps:
                    async with self._alloc_lock:
                        pieces = await self._plan_zeroed(gaps, d.pin, d.home)
                        seq = self._record({"op": "disk.map", "name": d.name, "map": pieces})
                    await self.journal.wait_durable(seq)
                    await self._push_update(d, lo, hi, exclude=conn.agent)
        hi = min(round_up(offset + length, seg), d.size)
        return await self._answer(d, lo, hi)

    # ------------------------------------------------------------ coherence helpers
    async def _plan_zeroed(self, targets: list[tuple[int, int]], pin: int | None,
                           home: int | None, preallocate: bool = False) -> list[list[int]]:
        """Place and zero storage for targets [(vstart, length)]; hold _alloc_lock."""
        pieces = self._plan(targets, pin, home)
        await self._zero(pieces, preallocate)
        self._check_still_free(pieces)
        return pieces

    def _record(self, rec: dict[str, Any]) -> int:
        try:
            return self.journal.record(rec)
        except StateError as e:  # a planning bug: refuse the request, change nothing
            log.error("refused %s: %s", rec.get("op"), e)
            raise P.RemoteError(P.E_INTERNAL, f"internal error: {e}") from None

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

    @asynccontextmanager
    async def _restrict(self, d: Disk, start: int, end: int,
                        exclude: Agent | None) -> AsyncIterator[None]:
        """Turn off I/O on [start, end) at every caching agent, drained, for the block."""
        await self.agents.wait_grace()
        rng = (start, end)
        self._restricted.setdefault(id(d), []).append(rng)
        self._bump()
        try:
            agents = self.agents.caching(d.name, exclude)
            if agents:
                await self.agents.push_all(agents, {
                    "push": "update", "disk": d.name, "epoch": d.epoch, "size": d.size,
                    "start": start, "end": end, "rows": self._rows(d, start, end),
                    "drain": True, "v": self.version})
            yield
        finally:
            lst = self._restricted.get(id(d), [])
            if rng in lst:
                lst.remove(rng)
            if not lst:
                self._restricted.pop(id(d), None)
            self._bump()
            self._restriction_lifted.set()
            self._restriction_lifted = trio.Event()

    async def _push_update(self, d: Disk, start: int, end: int,
                           exclude: Agent | None = None) -> None:
        self._bump()
        agents = self.agents.caching(d.name, exclude)
        if agents:
            end = max(start, min(end, d.size))
            await self.agents.push_all(agents, {
                "push": "update", "disk": d.name, "epoch": d.epoch, "size": d.size,
                "start": start, "end": end, "rows": self._rows(d, start, end), "drain": False,
                "v": self.version})

    # ------------------------------------------------------------ check
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

    # ------------------------------------------------------------ dispatch
    async def dispatch(self, op: str, args: dict[str, Any], conn: Any = None) -> Any:
        method = getattr(self, op.replace(".", "_"), None)
        if method is None:
            raise P.RemoteError(P.E_UNSUPPORTED, f"operation {op!r} is not implemented")
        if op in P.CONN_OPS:
            return await method(conn=conn, **args)
        return await method(**args)
