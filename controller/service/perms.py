"""A disk's owner, group and mode: set, journal, push (docs/permissions.md). The rules
and the record's handler are controller/perms.py; agents show them (virtfs/perms.py)."""

from __future__ import annotations

from .. import protocol as P
from ..records_attrs import MAX_ID, MODE_BITS, DiskPerms
from .context import Caller, Context


def check_perms(uid: int | None, gid: int | None, mode: int | None) -> None:
    """RemoteError E_INVALID for a uid or gid outside 0..MAX_ID or a mode outside
    0..0o777 (None: not given)."""
    for what, v, hi in (("uid", uid, MAX_ID), ("gid", gid, MAX_ID), ("mode", mode, MODE_BITS)):
        if v is not None and not 0 <= v <= hi:
            raise P.invalid(f"{what} {v} is out of range (0 to {hi:#o})" if what == "mode"
                            else f"{what} {v} is out of range (0 to {hi})")


class Perms:
    """disk.perms, from vdctl (`disk set --owner/--group/--mode`) or an agent (chmod,
    chown through a mount, which checked the kernel's rules); owns nothing."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.journal = ctx.journal
        self.agents = ctx.agents

    async def disk_perms(self, name: str, uid: int | None = None, gid: int | None = None,
                         mode: int | None = None, conn: Caller | None = None
                         ) -> dict[str, object]:
        """Set disk name's owner uid, group gid and mode (0..0o777); each None keeps
        its value. Journaled (disk.perms), then every other agent is told the disk
        changed (a namespace push: it drops its cached attributes, as for disk.times).
        Returns the disk's info. RemoteError E_INVALID (a value out of range, a
        snapshot: read-only), E_NOT_FOUND (no such disk)."""
        check_perms(uid, gid, mode)
        if P.is_snapshot_name(name):
            raise P.invalid(f"{name!r} is a snapshot: read-only (its permissions are its "
                            "disk's when it was taken)")
        d = self.ctx.disk(name)
        async with self.ctx.dlock(d):
            new = (d.owner if uid is None else uid, d.group if gid is None else gid,
                   d.mode if mode is None else mode)
            if new != (d.owner, d.group, d.mode):
                await self.journal.commit(DiskPerms(d.name, *new))
        # with the values: an agent that has the disk open shows them from its listing,
        # which it does not reload for an open disk (virtfs/namespace.py)
        await self.agents.notify({"push": "namespace", "changed": [d.name],
                                  "perms": [[d.name, d.owner, d.group, d.mode]]},
                                 exclude=getattr(conn, "agent", None))
        return self.ctx.disk_info(d)
