"""A disk's owner, group and mode as a mount shows and changes them (docs/permissions.md).

The controller keeps them (disk.perms records, controller/perms.py); each is None
until set, and a mount then shows what it showed before disks had permissions: its
own uid and gid and mode 0644. A snapshot shows no write bits whatever its mode.

chmod and chown through a mount follow chmod(2) and chown(2): only root changes the
owner (the owner may "change" it to itself); the owner or root changes the mode; the
owner changes the group to one of its own groups, root to any. Every mount has
default_permissions, so the kernel checks the same (and each open against the mode)
before a request reaches us; these checks stand behind it (a mount without the option
would rely on them alone). Root is uid 0 here: a FUSE request carries no capabilities.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from .errors import DiskError

DEFAULT_MODE = 0o644  # a disk whose mode was never set (what mounts always showed)
WRITE_BITS = 0o222
MODE_BITS = 0o777  # as the controller keeps them: no setuid, setgid, sticky


@dataclass(frozen=True)
class Owner:
    """Who a disk shows as owned by, and its permission bits, in this mount."""

    uid: int
    gid: int
    mode: int


def shown(owner: int | None, group: int | None, mode: int | None, snapshot: bool,
          mounter: tuple[int, int]) -> Owner:
    """The uid, gid and permission bits a mount shows for a disk whose stored ones are
    owner, group, mode (None: the default: mounter's (uid, gid), DEFAULT_MODE)."""
    m = DEFAULT_MODE if mode is None else mode
    return Owner(mounter[0] if owner is None else owner,
                 mounter[1] if group is None else group,
                 m & ~WRITE_BITS if snapshot else m)


def caller_groups(pid: int, gid: int) -> set[int]:
    """The groups of the calling process: its gid and its supplementary groups (from
    /proc/PID/status; only gid if the process is gone)."""
    groups = {gid}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
                    break
    except OSError:
        pass
    return groups


def check_change(caller: int, groups: set[int], cur: Owner, uid: int | None,
                 gid: int | None, mode: int | None) -> None:
    """Refuse, as chown(2) and chmod(2) do, a change by user caller (in groups) of a
    file showing cur to uid, gid, mode (None: unchanged): DiskError(EPERM)."""
    if caller == 0:
        return
    if uid is not None and not (uid == cur.uid == caller):
        raise DiskError(errno.EPERM, "only root may change a disk's owner")
    if caller != cur.uid and (gid is not None or mode is not None):
        raise DiskError(errno.EPERM, "only the owner or root may change a disk's mode "
                        "or group")
    if gid is not None and gid != cur.gid and gid not in groups:
        raise DiskError(errno.EPERM, "the owner may change a disk's group only to one "
                        "of its own groups")


def mounter() -> tuple[int, int]:
    """The uid and gid of this process: what a disk without an owner shows."""
    return os.getuid(), os.getgid()
