"""A disk's owner, group and mode (docs/permissions.md): the rules of the disk.perms
record, its handler for ``State.apply``, and vdctl's parsing of --owner, --group and
--mode.

A disk's owner, group and mode are each None until set: a mount then shows what it
showed before disks had permissions, its own uid and gid (those of the user who
mounted) and mode 0644, so a state dir from before them shows nothing new. A set
value shows the same in every mount. Snapshots take their disk's at snapshot time,
clones their snapshot's at clone time; a mount shows a snapshot read-only whatever
its mode (virtfs/perms.py). Pure: no trio, no I/O but the user and group databases.
"""

from __future__ import annotations

import grp
import pwd
from typing import TYPE_CHECKING

from . import records_attrs as R
from .records_attrs import MAX_ID, MODE_BITS
from .tables import Disk, StateError

if TYPE_CHECKING:
    from .state import State


def disk_perms(state: State, rec: R.DiskPerms) -> None:
    """State.apply's handler of disk.perms: disk rec.name takes rec's owner, group and
    mode (each None: the mount's default). StateError if there is no such disk (a
    snapshot is none: read-only)."""
    d = state.disk(rec.name)
    for v, hi in ((rec.uid, MAX_ID), (rec.gid, MAX_ID), (rec.mode, MODE_BITS)):
        if v is not None and not 0 <= v <= hi:
            raise StateError(f"bad disk.perms value {v!r}")
    d.owner, d.group, d.mode = rec.uid, rec.gid, rec.mode


def inherit(src: Disk, dst: Disk) -> None:
    """dst (a new snapshot or clone of src) takes src's owner, group and mode."""
    dst.owner, dst.group, dst.mode = src.owner, src.group, src.mode


def parse_mode(text: str) -> int:
    """An octal mode as chmod(1) takes it ("640", "0640", "0o640") in 0..0o777;
    ValueError with a one-line message otherwise (symbolic modes are not taken)."""
    t = text.strip()
    digits = t[2:] if t[:2].lower() == "0o" else t
    if not digits or any(c not in "01234567" for c in digits) or int(digits, 8) > MODE_BITS:
        raise ValueError(f"bad mode {text!r}: give octal permission bits, 0 to 777 "
                         "(e.g. 0640)")
    return int(digits, 8)


def parse_user(text: str) -> int:
    """A uid from a user name or a number; ValueError "unknown user ..." otherwise."""
    if text.isdigit():
        if int(text) > MAX_ID:
            raise ValueError(f"bad uid {text!r}: more than {MAX_ID}")
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise ValueError(f"unknown user {text!r}") from None


def parse_group(text: str) -> int:
    """A gid from a group name or a number; ValueError "unknown group ..." otherwise."""
    if text.isdigit():
        if int(text) > MAX_ID:
            raise ValueError(f"bad gid {text!r}: more than {MAX_ID}")
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ValueError(f"unknown group {text!r}") from None


def user_name(uid: int) -> str:
    """"1000 (alice)", or "1000" for a uid with no name here."""
    try:
        return f"{uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    """"64055 (libvirt-qemu)", or "64055" for a gid with no name here."""
    try:
        return f"{gid} ({grp.getgrgid(gid).gr_name})"
    except KeyError:
        return str(gid)
