"""Wire messages shared by the controller, the agent and vdctl.

A frame is a 4-byte big-endian length and a msgpack map. Requests are
``{"id": int, "op": str, "args": map}``; replies ``{"id": int, "ok": true,
"result": ...}`` or ``{"id": int, "ok": false, "error": {"code", "message"}}``.
The first request on a connection must be ``hello`` with ``PROTOCOL_VERSION``.
The server may also send unsolicited ``{"push": str, ...}`` frames to agents.
A group's leader adds ``"term": TOKEN`` to every reply and push (absent, or 0, from a
controller that runs alone); agents refuse frames of a lower term than they have seen
(client.TermFloor, docs/ha.md "Agents check the term").
Table entries and their compact wire form are in ``rows`` (re-exported here).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# table entries on the wire (controller/rows.py), re-exported: P.Entry, P.encode_rows, ...
from .rows import (  # noqa: F401
    ERROR,
    INVALID,
    MAX_ROW_OFFSET,
    NO_LUN,
    NOWRITE,
    STATE_NAMES,
    WIRE_COLUMNS,
    ZERO,
    Entry,
    RowColumns,
    RowsError,
    decode_rows,
    encode_rows,
    state_names,
)

# 2: agents must apply the "freeze" push (a snapshot's O(1) write fence) and call
# disk.sync for a write fault's "sync" debt at fsync; an agent of version 1 would do
# neither (its writes would land in the snapshot, its fsync would claim too much), so
# the hello refuses it: controllers and agents are upgraded together
PROTOCOL_VERSION = 2

BLOCK_SIZE = 4096
# a labelled container's first MiB: its label, and the alignment of its data (as LVM's
# 1 MiB data offset: segments stay aligned to what lies below; docs/labels.md)
LABEL_BYTES = 1 << 20
DEFAULT_SEGMENT_SIZE = 4 << 20
MIN_SEGMENT_SIZE = BLOCK_SIZE
MAX_SEGMENT_SIZE = 1 << 40
MAX_DISK_SIZE = 1 << 60
MAX_NAME_BYTES = 255  # disk names (NAME_MAX)
MAX_CONTAINER_NAME_BYTES = 128

# Error codes, with the errno an agent maps them to.
E_NOT_FOUND = "not_found"
E_EXISTS = "exists"
E_INVALID = "invalid"
E_NO_SPACE = "no_space"
E_BUSY = "busy"
E_PROTOCOL = "protocol"
E_UNAUTHORIZED = "unauthorized"
E_IO = "io_error"
E_INTERNAL = "internal"
E_UNSUPPORTED = "unsupported"
E_READONLY = "read_only"  # a write to a snapshot (the agent answers EROFS)
# hello at a controller of a group that is not its leader (docs/ha.md): the error's
# ``leader`` names the leader's address when one is known; clients go there
E_NOT_LEADER = "not_leader"


class RemoteError(Exception):
    """An error reply, raised by the client and by service methods alike.

    leader: with E_NOT_LEADER, the leader's client address ("" or None: not known).
    """

    def __init__(self, code: str, message: str, leader: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.leader = leader

    def to_wire(self) -> dict[str, str]:
        wire = {"code": self.code, "message": self.message}
        if self.leader:
            wire["leader"] = self.leader
        return wire


def not_leader(leader: str | None) -> RemoteError:
    """The answer of a controller that does not lead its group (docs/ha.md)."""
    if leader:
        return RemoteError(E_NOT_LEADER, f"not the leader; the leader is {leader}", leader)
    return RemoteError(E_NOT_LEADER, "not the leader, and no leader is elected yet")


def invalid(message: str) -> RemoteError:
    return RemoteError(E_INVALID, message)


def not_found(what: str, name: str) -> RemoteError:
    return RemoteError(E_NOT_FOUND, f"no such {what}: {name!r}")


# ---------------------------------------------------------------- validation

_CONTAINER_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")


# A snapshot's name: its disk's, SNAP_SEP, its own ("vm1@before"). No disk name holds
# SNAP_SEP (check_name), so the two kinds of table never clash.
SNAP_SEP = "@"
_RESERVED_IN_NAMES = "/\0" + SNAP_SEP  # in no disk name


def is_snapshot_name(name: str) -> bool:
    """Whether name is a snapshot's ("DISK@SNAP") rather than a disk's."""
    return SNAP_SEP in name


def snapshot_name(disk: str, snap: str) -> str:
    """The name of snapshot snap of disk: "DISK@SNAP"."""
    return f"{disk}{SNAP_SEP}{snap}"


def split_snapshot_name(name: str) -> tuple[str, str]:
    """(disk, snap) of a snapshot's name "DISK@SNAP" (split at the first SNAP_SEP).

    Raises ValueError if name is not a snapshot's."""
    disk, sep, snap = name.partition(SNAP_SEP)
    if not sep:
        raise ValueError(f"{name!r} is not a snapshot's name (DISK{SNAP_SEP}SNAP)")
    return disk, snap


# A disk unlinked while open (rm of an open file in a mount) is renamed at once to
# DELETED_PREFIX + "<n>/<its name>": a name no file name can be ('/'), so its own name
# is free for a new file at once (as on ext4); mounts hide it, `vdctl disk ls` marks it,
# and the controller removes it when the last agent closes it.
DELETED_PREFIX = "/deleted/"


def deleted_name(n: int, name: str) -> str:
    return f"{DELETED_PREFIX}{n}/{name}"


def former_name(name: str) -> str | None:
    """The name an unlinked-but-open disk had (None: name is not such a disk's)."""
    if not name.startswith(DELETED_PREFIX):
        return None
    return name[len(DELETED_PREFIX):].partition("/")[2]


def check_name(name: object, what: str = "disk name") -> str:
    """A disk name: what a Linux file system takes as a file name, less '@'.

    1..255 bytes of UTF-8 (NAME_MAX, path_resolution(7)); anything but '/' and NUL,
    which no file name may hold, and '@', kept for snapshots (NAME@SNAP,
    docs/snapshots.md); not '.' or '..'. Hidden names, spaces and non-ASCII are fine (rsync,
    editors and downloaders write '.name.XXXXXX' and rename it into place). Bytes that
    are not UTF-8 (lone surrogates from os.fsdecode) are refused. Raises RemoteError
    E_INVALID naming `what`.
    """
    if not isinstance(name, str):
        raise invalid(f"{what} must be a string")
    if not name:
        raise invalid(f"{what} must not be empty")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise invalid(f"{what} {name!r} is not valid UTF-8") from None
    if size > MAX_NAME_BYTES:
        raise invalid(f"{what} is longer than {MAX_NAME_BYTES} bytes of UTF-8")
    if name in (".", ".."):
        raise invalid(f"{what} may not be {name!r}")
    bad = sorted({c for c in name if c in _RESERVED_IN_NAMES})
    if bad:
        shown = " ".join(repr(c) for c in bad)
        raise invalid(f"{what} {name!r} may not contain {shown} ('/' and NUL are never "
                      "part of a file name; '@' is kept for snapshots)")
    return name


def check_container_name(name: object, what: str = "container name") -> str:
    """Container names: LVM's character set (letters, digits, . _ + -), 1..128 bytes."""
    if not isinstance(name, str):
        raise invalid(f"{what} must be a string")
    if not name:
        raise invalid(f"{what} must not be empty")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_CONTAINER_NAME_BYTES:
        raise invalid(f"{what} is longer than {MAX_CONTAINER_NAME_BYTES} bytes")
    if not _CONTAINER_NAME_RE.fullmatch(name):
        raise invalid(
            f"{what} {name!r} may use only letters, digits and . _ + - "
            "(and may not start with . + or -)"
        )
    return name


@dataclass(frozen=True)
class Field:
    name: str
    types: tuple[type, ...]
    required: bool = True
    default: Any = None


def _f(name: str, *types: type, required: bool = True, default: Any = None) -> Field:
    return Field(name, types, required, default)


NAME = _f("name", str)
# op -> (fields, roles allowed). Anything not listed here is refused.
OPS: dict[str, tuple[tuple[Field, ...], frozenset[str]]] = {}

ADMIN = frozenset({"admin"})
AGENT = frozenset({"agent"})
ANY = frozenset({"admin", "agent"})


def _op(name: str, *fields: Field, roles: frozenset[str] = ANY) -> None:
    OPS[name] = (fields, roles)


_op("status")
# a group's leader steps down for another member (to: its id, or any); controller/group.py
_op("group.step_down", _f("to", str, type(None), required=False), roles=ADMIN)
_op("container.add", NAME, _f("path", str), _f("size", int, type(None), required=False),
    _f("force", bool, required=False, default=False),
    _f("shared", bool, required=False, default=False), roles=ADMIN)
_op("container.set", NAME, _f("shared", bool), roles=ADMIN)
_op("container.ls")
_op("container.info", NAME)
_op("container.rm", NAME, _f("dry_run", bool, required=False, default=False), roles=ADMIN)
_op("disk.create", NAME, _f("size", int),
    _f("thick", bool, required=False, default=False),
    _f("segment_size", int, type(None), required=False),
    _f("container", str, type(None), required=False),
    *(_f(k, int, type(None), required=False) for k in ("uid", "gid", "mode")))
_op("disk.ls", _f("snapshots", bool, required=False, default=False))
_op("disk.info", NAME)
_op("disk.map", NAME, _f("start", int, required=False, default=0),
    _f("limit", int, type(None), required=False))
_op("disk.resize", NAME, _f("size", int),
    _f("allow_shrink", bool, required=False, default=False),
    _f("grow_only", bool, required=False, default=False),
    _f("dry_run", bool, required=False, default=False))
_op("disk.rm", NAME, _f("dry_run", bool, required=False, default=False))
_op("disk.rename", NAME, _f("new", str), _f("replace", bool, required=False, default=False))
_op("disk.discard", NAME, _f("offset", int), _f("length", int))
_op("check", roles=ADMIN)
# movement (docs/movement.md)
_op("disk.migrate", NAME, _f("to", str), _f("dry_run", bool, required=False, default=False),
    _f("rate", int, type(None), required=False), roles=ADMIN)
_op("disk.set", NAME, _f("limits", dict), roles=ADMIN)
# a disk's owner, group and mode (docs/permissions.md): each left out (None) is kept;
# agents send chmod and chown through a mount
_op("disk.perms", NAME, *(_f(k, int, type(None), required=False) for k in ("uid", "gid", "mode")))
_op("container.drain", NAME, _f("to", str, type(None), required=False),
    _f("dry_run", bool, required=False, default=False),
    _f("rate", int, type(None), required=False), roles=ADMIN)
_op("container.fail", NAME, roles=ADMIN)
_op("container.restore", NAME, _f("relabel", bool, required=False, default=False),
    roles=ADMIN)
_op("job.ls")
_op("job.abort", _f("id", int), roles=ADMIN)
# snapshots and clones (names are DISK@SNAP)
_op("snap.create", NAME, roles=ADMIN)
_op("snap.ls", _f("name", str, type(None), required=False))
_op("snap.rm", NAME, _f("dry_run", bool, required=False, default=False), roles=ADMIN)
_op("snap.rollback", NAME, _f("force", bool, required=False, default=False),
    _f("dry_run", bool, required=False, default=False), roles=ADMIN)
_op("disk.clone", NAME, _f("new", str), roles=ADMIN)
# changed-block tracking and export (read-only; docs/export-diff.md)
_op("snap.diff", NAME, _f("from_snap", str, type(None), required=False),
    _f("start", int, required=False, default=0),
    _f("limit", int, type(None), required=False))
_op("snap.read", NAME, _f("offset", int), _f("length", int), roles=ADMIN)
_op("agent.ls")
# agent-only: the data path's control plane
# token: the agent process's session token (controller/roster.py); "" from agents that
# send none, which keep a whole lease of grace after a controller restart
_op("agent.register", _f("name", str), _f("host", str), _f("mount", str),
    _f("token", str, required=False, default=""), roles=AGENT)
_op("agent.heartbeat", roles=AGENT)
_op("agent.bye", roles=AGENT)
_op("agent.ack", _f("pid", int), roles=AGENT)
_op("disk.open", NAME, roles=AGENT)
_op("disk.close", NAME, _f("handle", int, type(None), required=False), roles=AGENT)
_op("disk.table", NAME, roles=AGENT)
_op("disk.fault", NAME, _f("offset", int), _f("length", int), _f("write", bool), roles=AGENT)
_op("disk.allocate", NAME, _f("offset", int), _f("length", int), _f("reserve", bool),
    _f("least", int, type(None), required=False), roles=AGENT)
# an fsync's wait for the write faults it owes (the "sync" [boot, seq] of their answers)
_op("disk.sync", NAME, _f("boot", int), _f("seq", int), roles=AGENT)
_op("disk.trim", NAME, _f("size", int), _f("expect", int), roles=AGENT)
_op("disk.times", NAME, _f("mtime", float, int), _f("stime", float, int), roles=AGENT)
_op("disk.unlink", NAME, roles=AGENT)
_op("io.error", NAME, _f("lun", int), _f("offset", int), _f("message", str), roles=AGENT)

# ops whose service method also receives the calling connection
CONN_OPS = frozenset({"agent.register", "agent.heartbeat", "agent.bye", "disk.open",
                      "disk.close",
                      "disk.table",
                      "disk.fault", "disk.sync", "disk.allocate", "disk.trim", "disk.times",
                      "disk.unlink",
                      "disk.discard", "disk.rm", "disk.resize", "disk.perms"})


def validate_args(op: str, args: object) -> dict[str, Any]:
    """Type-check a request's args against the op's schema; return them with defaults."""
    spec = OPS.get(op)
    if spec is None:
        raise RemoteError(E_UNSUPPORTED, f"unknown operation {op!r}")
    fields, _roles = spec
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise invalid("args must be a map")
    known = {f.name for f in fields}
    extra = sorted(set(args) - known)
    if extra:
        raise invalid(f"{op}: unexpected argument(s) {', '.join(map(str, extra))}")
    out: dict[str, Any] = {}
    for f in fields:
        if f.name not in args:
            if f.required:
                raise invalid(f"{op}: missing argument {f.name!r}")
            out[f.name] = f.default
            continue
        value = args[f.name]
        # bool is an int subclass: never let True pass as a size.
        ok = any(
            (type(value) is bool) if t is bool
            else (isinstance(value, t) and type(value) is not bool)
            for t in f.types
        )
        if not ok:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in f.types)
            raise invalid(f"{op}: argument {f.name!r} must be {names}")
        out[f.name] = value
    return out
