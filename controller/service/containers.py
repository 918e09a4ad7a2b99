"""Container operations: add, ls, info, rm."""

from __future__ import annotations

import os

import trio

from .. import protocol as P
from .. import storage
from ..records import ContainerAdd, ContainerRm
from ..units import human
from .context import Context
from .movement import Movement


class Containers:
    """The admin's container operations (fail and restore are Movement's).

    Owns the container paths a container.add is probing.
    """

    def __init__(self, ctx: Context, movement: Movement):
        self.ctx = ctx
        self.state = ctx.state
        self.journal = ctx.journal
        self.movement = movement
        self._adding_paths: set[str] = set()

    async def container_add(self, name: str, path: str, size: int | None) -> dict[str, object]:
        """Add the file or block device at path as container name (a missing file is
        created, sparse, with size bytes). Raises RemoteError E_EXISTS, E_INVALID,
        E_NOT_FOUND, E_IO."""
        P.check_container_name(name)
        if name in self.state.containers:
            raise P.RemoteError(P.E_EXISTS, f"container {name!r} already exists")
        storage.check_container_path(path)
        if size is not None and size < P.BLOCK_SIZE:
            raise P.invalid(f"container size must be at least {P.BLOCK_SIZE} bytes")
        # one add per path at a time: a concurrent add could probe the file while this one
        # creates it, register it first, and then see this one unlink it on its clash
        if path in self._adding_paths:
            raise P.RemoteError(P.E_EXISTS, f"container path {path!r} is being added")
        self._adding_paths.add(path)
        try:
            taken = {c.path: c.name for c in self.state.containers.values()}
            csize, created = await trio.to_thread.run_sync(storage.open_container_path, path,
                                                            size, taken)
            # re-check after the await: another request may have taken the name
            clash = name in self.state.containers or any(
                c.path == path for c in self.state.containers.values())
            if clash:
                if created:
                    os.unlink(path)
                raise P.RemoteError(P.E_EXISTS, f"container {name!r} or path {path!r} was "
                                    "added meanwhile")
            lun = self.state.next_lun
            await self.journal.commit(ContainerAdd(name, lun, path, csize, created))
        finally:
            self._adding_paths.discard(path)
        return self.state.containers[name].to_dict()

    async def container_ls(self) -> list[dict[str, object]]:
        """Every container, by LUN."""
        return [self.movement.container_dict(c)
                for c in sorted(self.state.containers.values(), key=lambda c: c.lun)]

    async def container_info(self, name: str) -> dict[str, object]:
        """A container, the bytes each disk holds on it, and its free ranges' count."""
        c = self.ctx.container(name)
        info = self.movement.container_dict(c)
        disks: dict[str, int] = {}
        for d, e in self.state.lun_users(c.lun):
            disks[d.name] = disks.get(d.name, 0) + e.length
        info["disks"] = [{"name": k, "bytes": v} for k, v in sorted(disks.items())]
        info["free_ranges"] = len(c.space)
        return info

    async def container_rm(self, name: str) -> dict[str, object]:
        """Remove an empty container nothing is pinned to and no job uses; E_BUSY else."""
        c = self.ctx.container(name)
        if c.used:
            users = sorted({d.name for d, _ in self.state.lun_users(c.lun)})
            raise P.RemoteError(
                P.E_BUSY, f"container {name!r} holds {human(c.used)} of data (disks: "
                f"{', '.join(users) or '-'}); remove or move them first")
        for d in self.state.disks.values():
            if d.pin == c.lun:
                raise P.RemoteError(P.E_BUSY, f"disk {d.name!r} is pinned to container {name!r}")
        for j in self.state.jobs.values():
            if j.state == "running" and c.lun in (j.src, j.dst):
                raise P.RemoteError(P.E_BUSY, f"job {j.id} ({j.kind}) uses container "
                                    f"{name!r}; wait for it or abort it")
        info = c.to_dict()
        await self.journal.commit(ContainerRm(name))
        return info
