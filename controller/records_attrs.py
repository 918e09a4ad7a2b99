"""Journal records of a disk's file attributes: its owner, group and mode
(docs/permissions.md). records.py lists them with the others (RECORDS) and decodes
them; controller/perms.py holds the rules and the handler ``State.apply`` uses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Self

from .recordbase import Record, Wire, bad_field, get_str, record

MAX_ID = (1 << 32) - 2  # uids and gids are 32-bit; (uid_t)-1 means "unchanged" to chown(2)
MODE_BITS = 0o777  # read, write, execute for owner, group, others: a disk has no
# use for setuid, setgid or sticky (and none is ever to be cleared at a write)


def get_opt_id(d: Mapping[str, object], key: str, hi: int) -> int | None:
    """An int in [0, hi], or None (the mount's default); StateError otherwise (the key
    too is required)."""
    v = d.get(key)
    if (v is None and key in d) or (type(v) is int and 0 <= v <= hi):
        return v
    raise bad_field(d, key, v, f"null or an integer in 0..{hi}")


@record
class DiskPerms(Record):
    """Disk name's owner uid, group gid and mode (permission bits, 0..0o777), as
    stat(2) shows them in every mount. None: what a mount showed before disks had
    permissions (its own uid, its own gid, 0644)."""

    OP: ClassVar[str] = "disk.perms"
    name: str
    uid: int | None
    gid: int | None
    mode: int | None

    def to_wire(self) -> Wire:
        return {"op": self.OP, "name": self.name, "uid": self.uid, "gid": self.gid,
                "mode": self.mode}

    @classmethod
    def from_wire(cls, d: Mapping[str, object]) -> Self:
        return cls(get_str(d, "name"), get_opt_id(d, "uid", MAX_ID),
                   get_opt_id(d, "gid", MAX_ID), get_opt_id(d, "mode", MODE_BITS))
