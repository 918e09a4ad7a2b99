"""Container operations: add, ls, info, rm (labels: labels.py; fail, restore: movement.py)."""

from __future__ import annotations

import os

import trio

from .. import label, storage
from .. import protocol as P
from ..records import ContainerAdd, ContainerRm, ContainerShare
from ..state import Container
from ..units import human
from .context import Context
from .labels import Labels
from .movement import Movement


class Containers:
    """The admin's container operations (fail and restore are Movement's).

    Owns the lock that lets one container.add run at a time.
    """

    def __init__(self, ctx: Context, movement: Movement, labels: Labels):
        self.ctx = ctx
        self.state = ctx.state
        self.journal = ctx.journal
        self.movement = movement
        self.labels = labels
        self._adding = trio.Lock()

    async def container_add(self, name: str, path: str, size: int | None,
                            force: bool = False, shared: bool = False) -> dict[str, object]:
        """Add the file or block device at path as container name (a missing file is
        created, sparse, with size bytes) and write its label (docs/labels.md).

        An existing path is probed first (Labels.probe_new): another installation's
        label or another format's signature is refused unless force. Raises RemoteError
        E_EXISTS, E_INVALID, E_NOT_FOUND, E_BUSY, E_IO.
        """
        P.check_container_name(name)
        if name in self.state.containers:
            raise P.RemoteError(P.E_EXISTS, f"container {name!r} already exists")
        storage.check_container_path(path)
        least = P.LABEL_BYTES + P.BLOCK_SIZE
        if size is not None and size < least:
            raise P.invalid(f"container size must be at least {human(least, True)} (a block for "
                            "its label and one for data)")
        # one add at a time: a concurrent add could probe the file while this one creates
        # it, or take the LUN this one's label names
        async with self._adding:
            if name in self.state.containers:
                raise P.RemoteError(P.E_EXISTS, f"container {name!r} already exists")
            taken = {c.path: c.name for c in self.state.containers.values()}
            csize, created = await trio.to_thread.run_sync(storage.open_container_path, path,
                                                            size, taken, self.ctx.may_write)
            try:
                if csize < least:
                    raise P.invalid(f"{path!r} holds {human(csize)}, less than "
                                    f"{human(least, True)} (a block for its label and one "
                                    "for data)")
                if not created:
                    await self.labels.probe_new(path, force)
                lun, cid = self.state.next_lun, label.new_id()
                await self.labels.write_new(path, self.labels.label_for(name, lun, csize, cid))
            except BaseException:
                if created:
                    os.unlink(path)
                raise
            await self.journal.commit(ContainerAdd(name, lun, path, csize, created, cid,
                                                   bool(shared)))
        return self.container_dict(self.state.containers[name])

    async def container_set(self, name: str, shared: bool) -> dict[str, object]:
        """Mark a container shared between hosts (or not): agents then do its I/O with
        O_DIRECT, so a host fenced by its lease has no dirty pages of it left to land
        (docs/fencing.md). Journaled (container.share), then pushed to every agent that
        holds a lease; each switches its fd (syncing the old one first) before it acks.
        RemoteError E_NOT_FOUND."""
        c = self.ctx.container(name)
        if c.shared != shared:
            await self.journal.commit(ContainerShare(name, shared))
            agents = self.ctx.agents
            agents.expire()
            await agents.push_all(list(agents.agents.values()), {
                "push": "shared",
                "shared": [x.lun for x in self.state.containers.values() if x.shared]})
        return self.container_dict(c)

    def container_dict(self, c: Container) -> dict[str, object]:
        """A container as vdctl shows it (Movement.container_dict) with its label."""
        info = self.movement.container_dict(c)
        info["label"] = self.labels.describe(c)
        return info

    async def container_ls(self) -> list[dict[str, object]]:
        """Every container, by LUN."""
        return [self.container_dict(c)
                for c in sorted(self.state.containers.values(), key=lambda c: c.lun)]

    async def container_info(self, name: str) -> dict[str, object]:
        """A container, the bytes each disk holds on it, and its free ranges' count."""
        c = self.ctx.container(name)
        info = self.container_dict(c)
        disks: dict[str, int] = {}
        for d, e in self.state.lun_users(c.lun):
            disks[d.name] = disks.get(d.name, 0) + e.length
        info["disks"] = [{"name": k, "bytes": v} for k, v in sorted(disks.items())]
        info["free_ranges"] = len(c.space)
        return info

    async def container_rm(self, name: str, dry_run: bool = False) -> dict[str, object]:
        """Remove an empty container nothing is pinned to and no job uses; E_BUSY else.
        Answers its info; dry_run: the same checks and answer ("dry_run" true), nothing
        removed (the label's wipe, whose failure the real op adds as a "warning", is
        not tried)."""
        info = self._rm_plan(self.ctx.container(name))
        if dry_run:
            return {**info, "dry_run": True}
        async with self._adding:  # an add of the same path must not see the wipe late
            c = self.ctx.container(name)
            info = self._rm_plan(c)
            await self.journal.commit(ContainerRm(name))
            warning = await self.labels.wipe(c)
        if warning is not None:
            info["warning"] = warning
        return info

    def _rm_plan(self, c: Container) -> dict[str, object]:
        """container.rm's answer for c (its info); E_BUSY if c holds data, a disk is
        pinned to it or a job uses it. The real op and its dry run both use it."""
        name = c.name
        if c.used:
            users = {d.name: d.is_snapshot for d, _ in self.state.lun_users(c.lun)}
            disks = sorted(n for n, snap in users.items() if not snap)
            snaps = sorted(n for n, snap in users.items() if snap)
            held = f"disks: {', '.join(disks) or '-'}"
            if snaps:
                held += f"; snapshots: {', '.join(snaps)}"
            raise P.RemoteError(
                P.E_BUSY, f"container {name!r} holds {human(c.used)} of data ({held}); "
                "remove them or move them off (vdctl container drain)")
        for d in self.state.disks.values():
            if d.pin == c.lun:
                raise P.RemoteError(P.E_BUSY, f"disk {d.name!r} is pinned to container {name!r}")
        for j in self.state.jobs.values():
            if j.state == "running" and c.lun in (j.src, j.dst):
                raise P.RemoteError(P.E_BUSY, f"job {j.id} ({j.kind}) uses container "
                                    f"{name!r}; wait for it or abort it")
        return c.to_dict()
