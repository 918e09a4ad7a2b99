"""One method per operation: validate, plan, record through the journal, reply.

Planning and ``journal.record`` happen in one step of the event loop (no
await between them), so concurrent requests never plan against a stale
table; the reply waits for the group commit.
"""

from __future__ import annotations

import os
import stat
import time
from typing import Any

import trio

from . import protocol as P
from .allocator import NoSpace
from .extents import Extent
from .journal import Journal
from .state import Container, Disk, State, check, round_up

VERSION = "0.1.0"
MAX_MAP_ROWS = 65536


def _size_of(path: str) -> tuple[int, bool]:
    """(size, is_block_device) of an existing file or block device."""
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.lseek(fd, 0, os.SEEK_END), True
        finally:
            os.close(fd)
    if stat.S_ISREG(st.st_mode):
        return st.st_size, False
    raise P.invalid(f"container path {path!r} is neither a regular file nor a block device")


def _check_container_path(path: str) -> None:
    if "\0" in path or not os.path.isabs(path):
        raise P.invalid(f"container path {path!r} must be absolute")
    if os.path.normpath(path) != path or ".." in path.split("/"):
        raise P.invalid(f"container path {path!r} must be normalised (no '..', '//', "
                        "or trailing '/')")


def _open_container_path(path: str, size: int | None, taken: dict[str, str]) -> tuple[int, bool]:
    """Probe (or create, sparse) a container's file; (size to use, created)."""
    real = os.path.realpath(path)
    for other, cname in taken.items():
        if os.path.realpath(other) == real:
            raise P.RemoteError(P.E_EXISTS, f"{path!r} is already container {cname!r}")
    if os.path.lexists(path):
        fsize, _blk = _size_of(path)
        if size is not None and size > fsize:
            raise P.invalid(f"{path!r} holds {fsize} bytes, less than --size {size}")
        csize = size if size is not None else fsize
        if csize < 4096:
            raise P.invalid(f"{path!r} is smaller than 4096 bytes")
        return csize, False
    if size is None:
        raise P.RemoteError(P.E_NOT_FOUND, f"container path {path!r} does not exist (give "
                            "--size to create a sparse file there)")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise P.RemoteError(P.E_NOT_FOUND, f"directory {parent!r} does not exist")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise P.RemoteError(P.E_IO, f"cannot create {path!r}: {e.strerror}") from None
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        os.unlink(path)
        raise P.RemoteError(P.E_IO, f"cannot size {path!r}: {e.strerror}") from None
    os.close(fd)
    return size, True


class Service:
    def __init__(self, state: State, journal: Journal, state_dir: str):
        self.state = state
        self.journal = journal
        self.state_dir = state_dir
        self.started = time.time()

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

    def _plan(self, length: int, pin: int | None, home: int | None,
              vstart: int) -> list[list[int]]:
        """Place length bytes (block-rounded) starting at vstart; NoSpace if short."""
        need = round_up(length)
        cands = self._candidates(pin, home)
        if not cands:
            raise P.RemoteError(P.E_NO_SPACE, "no containers to allocate from "
                                "(add one with: vdctl container add NAME PATH --size SIZE)")
        total_free = sum(c.space.free for c in cands)
        if need > total_free:
            where = f"container {cands[0].name!r}" if pin is not None else "the pool"
            raise P.RemoteError(
                P.E_NO_SPACE, f"need {need} bytes but {where} has only {total_free} free")
        pieces: list[list[int]] = []
        pos = vstart
        remaining = need
        for c in cands:
            if not remaining:
                break
            take = min(remaining, c.space.free)
            if not take:
                continue
            try:
                plan = c.space.plan(take)
            except NoSpace:
                continue
            for off, n in plan:
                pieces.append([pos, n, c.lun, off])
                pos += n
            remaining -= take
        # the last piece may cover a short disk tail: map only the virtual length
        excess = need - length
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
        _check_container_path(path)
        if size is not None and size < 4096:
            raise P.invalid("container size must be at least 4096 bytes")
        taken = {c.path: c.name for c in self.state.containers.values()}
        csize, created = await trio.to_thread.run_sync(_open_container_path, path, size, taken)
        # re-check after the await: another request may have taken the name
        if name in self.state.containers:
            if created:
                os.unlink(path)
            raise P.RemoteError(P.E_EXISTS, f"container {name!r} already exists")
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
        pieces = self._plan(size, pin, home, 0) if thick else []
        await self.journal.commit({
            "op": "disk.create", "name": name, "size": size, "segment_size": seg,
            "thick": thick, "pin": pin, "home": home, "ctime": round(time.time(), 3),
            "map": pieces,
        })
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
        rows = []
        nxt = None
        for e in d.extents.entries(start, d.size):
            if len(rows) == lim:
                nxt = e.vstart
                break
            rows.append(self._row(e))
        luns = {str(c.lun): c.name for c in self.state.containers.values()}
        return {"name": d.name, "size": d.size, "epoch": d.epoch, "containers": luns,
                "rows": rows, "next": nxt}

    async def disk_resize(self, name: str, size: int, allow_shrink: bool) -> dict[str, Any]:
        d = self._disk(name)
        if not 0 <= size <= P.MAX_DISK_SIZE:
            raise P.invalid(f"disk size must be between 0 and {P.MAX_DISK_SIZE} bytes")
        if size < d.size and not allow_shrink:
            raise P.invalid(f"shrinking {name!r} from {d.size} to {size} bytes discards data; "
                            "pass --allow-shrink to do it")
        pieces: list[list[int]] = []
        if size > d.size and d.thick:
            start = round_up(d.size)
            if size > start:
                pieces = self._plan(size - start, d.pin, d.home, start)
        if size != d.size:
            await self.journal.commit({"op": "disk.resize", "name": name, "size": size,
                                       "map": pieces})
        return self._disk_info(d)

    async def disk_rm(self, name: str) -> dict[str, Any]:
        d = self._disk(name)
        info = self._disk_info(d)
        await self.journal.commit({"op": "disk.rm", "name": name})
        return info

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
    async def dispatch(self, op: str, args: dict[str, Any]) -> Any:
        method = getattr(self, op.replace(".", "_"), None)
        if method is None:
            raise P.RemoteError(P.E_UNSUPPORTED, f"operation {op!r} is not implemented")
        return await method(**args)
