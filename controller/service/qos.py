"""Per-disk QoS limits: set, journal, push (docs/qos.md). Agents enforce them (virtfs/qos.py)."""

from __future__ import annotations

from .. import protocol as P
from ..records import DiskQos
from ..tables import QOS_KEYS
from .context import Context


class Qos:
    """The admin's `disk set` of QoS limits; owns nothing (the limits are the disk's)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.state = ctx.state
        self.journal = ctx.journal
        self.agents = ctx.agents

    async def disk_set(self, name: str, limits: dict[str, int | None]) -> dict[str, object]:
        """Change disk name's QoS limits: limits maps QOS_KEYS to a rate (ops/s or
        bytes/s, > 0), or to 0 or None to lift that limit; keys left out keep theirs.
        Journaled (disk.qos), then pushed to every agent that has the disk open (and
        sent with its table at every later open), so they hold across restarts of
        both. Returns the disk's info. RemoteError E_INVALID (unknown key, a negative
        rate), E_NOT_FOUND (no such disk; snapshots included)."""
        bad = sorted(set(limits) - set(QOS_KEYS))
        if bad:
            raise P.invalid(f"unknown QoS limit(s) {', '.join(bad)}")
        for k, v in limits.items():
            if v is not None and (type(v) is not int or v < 0):
                raise P.invalid(f"QoS limit {k} must be a rate of 0 (none) or more")
        d = self.ctx.disk(name)  # (a snapshot is not one: E_NOT_FOUND)
        async with self.ctx.dlock(d):
            new = dict(d.qos)
            for k, v in limits.items():
                if v:
                    new[k] = v
                else:
                    new.pop(k, None)
            if new != d.qos:
                await self.journal.commit(DiskQos(d.name, new))
                await self.agents.push_all(self.agents.caching(d),
                                           {"push": "qos", "disk": d.name, "qos": new})
        return self.ctx.disk_info(d)
