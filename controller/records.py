"""Journal records: one small class per op, with its validation and its wire form.

The service builds a record, ``Journal.record`` encodes ``rec.to_wire()`` (plus
the ``seq`` it assigns, last) and ``State.apply`` dispatches on the record's type.
Replay goes the other way: ``decode(d)`` checks a wire map's fields and picks the
class by ``d["op"]``. ``to_wire()`` gives exactly the map the service wrote before
records were typed (the same keys in the same order, lists for pieces and runs), so
the journal on disk is unchanged and a controller from before reads it.

What a record says on its own (types, ranges, names) is checked by ``from_wire``;
what depends on the tables (does the disk exist, is the space free) by ``apply``.
Both raise ``StateError``.

The classes are frozen to mypy only (see recordbase.py, which also holds the field
checks they share).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar, Self

from .protocol import SNAP_SEP
from .recordbase import (
    Named,
    Piece,
    Record,
    Segment,
    Wire,
    bad_field,
    get,
    get_bool,
    get_int,
    get_opt_int,
    get_opt_str,
    get_pieces,
    get_str,
    get_time,
    record,
    wire_pieces,
)
from .records_attrs import DiskPerms
from .records_pool import (
    ContainerAdd,
    ContainerFail,
    ContainerLabel,
    ContainerRestore,
    ContainerRm,
    ContainerShare,
    ControllerBoot,
)
from .records_storage import StorageRelocate
from .tables import JOB_KINDS, JOB_STATES, QOS_KEYS, StateError

# and the record classes below, those of records_pool.py (containers, boots) and of
# records_attrs.py (a disk's owner, group and mode)
__all__ = ["ContainerAdd", "ContainerFail", "ContainerLabel", "ContainerRestore",
           "ContainerRm", "ContainerShare", "ControllerBoot", "DiskPerms", "Piece", "Record",
           "StorageRelocate", "Wire", "decode", "record"]


# ---------------------------------------------------------------- disks


@record
class DiskCreate(Record):
    """A new disk (sizes in bytes) and the pieces a thick one maps at once."""

    OP: ClassVar[str] = "disk.create"
    name: str
    size: int
    segment_size: int
    thick: bool
    pin: int | None  # allocate only on this LUN, if set
    home: int  # preferred LUN for thin allocation
    ctime: float
    pieces: list[Piece]

    def to_wire(self) -> Wire:
        return {"op": self.OP, "name": self.name, "size": self.size,
                "segment_size": self.segment_size, "thick": self.thick, "pin": self.pin,
                "home": self.home, "ctime": self.ctime, "map": wire_pieces(self.pieces)}

    @classmethod
    def from_wire(cls, d: Mapping[str, object]) -> Self:
        return cls(get_str(d, "name"), get_int(d, "size", 0), get_int(d, "segment_size", 1),
                   get_bool(d, "thick"), get_opt_int(d, "pin"), get_int(d, "home"),
                   get_time(d, "ctime", 0.0), get_pieces(d))


@record
class DiskMap(Record):
    """Pieces of the disk get storage (a fault, an allocation, a copy on write)."""

    OP: ClassVar[str] = "disk.map"
    name: str
    pieces: list[Piece]

    def to_wire(self) -> Wire:
        return {"op": self.OP, "name": self.name, "map": wire_pieces(self.pieces)}

    @classmethod
    def from_wire(cls, d: Mapping[str, object]) -> Self:
        name = d.get("name")
        if type(name) is not str:
            raise bad_field(d, "name", name, "a string")
        return cls(name, get_pieces(d))


@record
class DiskTimes(Record):
    """An agent's times of a disk: its last change of content or size, and of either
    or its metadata (seconds since the epoch)."""

    OP: ClassVar[str] = "disk.times"
    name: str
    mtime: float
    stime: float

    def to_wire(self) -> Wire:
        return {"op": self.OP, "name": self.name, "mtime": self.mtime, "stime": self.stime}

    @classmethod
    def from_wire(cls, d: Mapping[str, object]) -> Self:
        name, mtime, stime = d.get("name"), d.get("mtime"), d.get("stime")
        if not (type(mtime) is float or type(mtime) is int) or not 0 <= mtime < 1e11 or not (
                type(stime) is float or type(stime) is int) or not 0 <= stime < 1e11:
            raise StateError(f"bad times {mtime!r}, {stime!r}")
        if type(name) is not str:
            raise bad_field(d, "name", name, "a string")
        return cls(name, float(mtime), float(stime))


@record
class DiskResize(Record):
    """The disk's new size (bytes), and the pieces a thick disk's growth maps."""

    OP: ClassVar[str] = "disk.resize"
    name: str
    size: int
    pieces: list[Piece]

    def to_wire(self) -> Wire:
        return {"op": self.OP, "name": self.name, "size": self.size,
                "map": wire_pieces(self.pieces)}

    @classmethod
    def from_wire(cls, d: Mapping[str, object]) -> Self:
        name, size = d.get("name"), d.get("size")
        if type(size) is not int or size < 0:
            raise StateError(f"bad size {size!r}")
        if type(name) is not str:
            raise bad_field(d, "name", name, "a string")
        return cls(name, size, get_pieces(d))


@record
class DiskRm(Named):
    """The disk goes, and the storage no snapshot or clone shares is freed."""

    OP: ClassVar[str] = "disk.rm"


@record
class DiskRename(Record):
    """The disk takes name new; replace: a disk of that name is removed at once."""

    OP: ClassVar[str] = "disk.rename"
    name: str
    new: str
    replace: bool = False

    def to_wire(self) -> Wire:
        w: Wire = {"op": self.OP, "name": self.name, "new": self.new}
        if self.replace:
            w["replace"] = True
        return w

    @classmethod
    def from_wire(cls, d: Mapping[str, object]) -> Self:
        name, new = get_str(d, "name"), get(d, "new")
        if type(new) is not str:
            raise StateError(f"cannot rename {name!r} to {new!r}")
        return cls(name, new, get_bool(d, "replace") if "replace" in d else False)


@record
class DiskPlace(Record):
    """Where the disk's new space goes: its home LUN and its pin (or None)."""

    OP: ClassVar[str] = "disk.place"
    name: str
    home: int
    pin: int | None

    def to_wire(self) -> Wire:
        return {"op": self.OP, "name": self.name, "home": self.home, "pin": self.pin}

    @classmethod
    def from_wire(cls, d: Mapping[str, object]) -> Self:
        return cls(get_str(d, "name"), get_int(d, "home"), get_opt_int(d, "pin"))


@record
class DiskQos(Record):
    """A disk's QoS limits: tables.QOS_KEYS -> a rate (ops/s, bytes/s) > 0; the keys
    left out are unlimited (docs/qos.md)."""

    OP: ClassVar[str] = "disk.qos"
    name: str
    limits: dict[str, int]

    def to_wire(self) -> Wire:
        return {"op": self.OP, "name": self.name, "limits": dict(self.limits)}

    @classmethod
    def from_wire(cls, d: Mapping[str, object]) -> Self:
        limits = get(d, "limits")
        if not isinstance(limits, dict) or not all(
                k in QOS_KEYS and type(v) is int and v > 0 for k, v in limits.items()):
            raise bad_field(d, "limits", limits, f"a map of {', '.join(QOS_KEYS)} to rates > 0")
        return cls(get_str(d, "name"), dict(limits))


@record
class DiskUnmap(Record):
    """Bytes [start, end) of the disk lose their storage (a discard or a trim)."""

    OP: ClassVar[str] = "disk.unmap"
    name: str
    start: int
    end: int

    def to_wire(self) -> Wire:
        return {"op": self.OP, "name": self.name, "start": self.start, "end": self.end}

    @classmethod
    def from_wire(cls, d: Mapping[str, object]) -> Self:
        name, start, end = d.get("name"), d.get("start"), d.get("end")
        if type(name) is str and type(start) is int and type(end) is int:
            return cls(name, start, end)
        return cls(get_str(d, "name"), get_int(d, "start"), get_int(d, "end"))  # raises


@record
class DiskClone(Record):
    """A writable disk new from snapshot snap ("DISK@SNAP"), sharing its storage."""

    OP: ClassVar[str] = "disk.clone"
    snap: str
    new: str
    ctime: float

    def to_wire(self) -> Wire:
        return {"op": self.OP, "snap": self.snap, "new": self.new, "ctime": self.ctime}

    @classmethod
    def from_wire(cls, d: Mapping[str, object]) -> Self:
        new = get(d, "new")
        if type(new) is not str or SNAP_SEP in new:
            raise StateError(f"cannot clone to {new!r}")
        return cls(get_str(d, "snap"), new, get_time(d, "ctime"))


# ---------------------------------------------------------------- moves (docs/movement.md)


@record
class MoveStart(Record):
    """Segment [vstart, vstart + length) of one stored extent gets an alternate location
    (lun, offset) with an empty bitmap (bytes throughout)."""

    OP: ClassVar[str] = "move.start"
    name: str
    vstart: int
    length: int
    lun: int
    offset: int

    def to_wire(self) -> Wire:
        return {"op": self.OP, "name": self.name, "vstart": self.vstart,
                "length": self.length, "lun": self.lun, "offset": self.offset}

    @classmethod
    def from_wire(cls, d: Mapping[str, object]) -> Self:
        vstart, length, lun, offset = (d.get(k) for k in ("vstart", "length", "lun", "offset"))
        if type(vstart) is int and type(length) is int and type(lun) is int and type(
                offset) is int:
            return cls(get_str(d, "name"), vstart, length, lun, offset)
        bad = next(v for v in (vstart, length, lun, offset) if type(v) is not int)
        raise StateError(f"bad move.start field {bad!r}")


@record
class MoveMark(Record):
    """Blocks (runs of (first, count), in blocks) of the segment moving at vstart now
    have their data at its alternate location."""

    OP: ClassVar[str] = "move.mark"
    name: str
    vstart: int
    runs: list[tuple[int, int]]

    def to_wire(self) -> Wire:
        return {"op": self.OP, "name": self.name, "vstart": self.vstart,
                "runs": [list(r) for r in self.runs]}

    @classmethod
    def from_wire(cls, d: Mapping[str, object]) -> Self:
        name, vstart, raw = d.get("name"), d.get("vstart"), d.get("runs")
        if type(raw) is not list:
            raise StateError("move.mark runs must be a list")
        runs = []
        for r in raw:
            if (type(r) is not list or len(r) != 2 or type(r[0]) is not int
                    or type(r[1]) is not int or r[0] < 0 or r[1] <= 0):
                raise StateError(f"bad move.mark run {r!r}")
            runs.append((r[0], r[1]))
        if type(name) is str and type(vstart) is int:
            return cls(name, vstart, runs)
        return cls(get_str(d, "name"), get_int(d, "vstart"), runs)  # raises


@record
class MoveCommit(Segment):
    """Every block is marked: the alternate location becomes the segment's location."""

    OP: ClassVar[str] = "move.commit"


@record
class MoveAbort(Segment):
    """The move is dropped: the segment stays where it was; the alternate is freed."""

    OP: ClassVar[str] = "move.abort"


# ---------------------------------------------------------------- jobs


@record
class JobStart(Record):
    """A background job (kind "migrate": disk to LUN dst; "drain": everything off LUN
    src, to dst or wherever placement puts it) starts at time started. placed: the
    (disk, home, pin) the job's disk.place records changed, as they were before: an
    abort puts them back (absent in journals written before aborts did). rate: the
    copier's limit in bytes/s, 0 for none (absent in journals written before it)."""

    OP: ClassVar[str] = "job.start"
    id: int
    kind: str
    disk: str | None
    src: int | None
    dst: int | None
    started: float
    placed: tuple[tuple[str, int, int | None], ...] = ()
    rate: int = 0

    def to_wire(self) -> Wire:
        out: Wire = {"op": self.OP, "id": self.id, "kind": self.kind, "disk": self.disk,
                     "src": self.src, "dst": self.dst, "started": self.started}
        if self.placed:
            out["placed"] = [list(p) for p in self.placed]
        if self.rate:
            out["rate"] = self.rate
        return out

    @classmethod
    def from_wire(cls, d: Mapping[str, object]) -> Self:
        jid, kind = get(d, "id"), get(d, "kind")
        if type(jid) is not int or type(kind) is not str or kind not in JOB_KINDS:
            raise StateError(f"bad job.start {jid!r} {kind!r}")
        return cls(jid, kind, get_opt_str(d, "disk"), get_opt_int(d, "src"),
                   get_opt_int(d, "dst"), get_time(d, "started"),
                   placements(d.get("placed", [])),
                   get_int(d, "rate", 0) if "rate" in d else 0)


def placements(w: object) -> tuple[tuple[str, int, int | None], ...]:
    """(disk, home, pin) triples from their wire form [[name, home, pin], ...];
    StateError if malformed."""
    if not isinstance(w, list | tuple):
        raise StateError(f"bad placements {w!r}")
    out = []
    for p in w:
        if (not isinstance(p, list | tuple) or len(p) != 3 or type(p[0]) is not str
                or type(p[1]) is not int or not (p[2] is None or type(p[2]) is int)):
            raise StateError(f"bad placement {p!r}")
        out.append((p[0], p[1], p[2]))
    return tuple(out)


@record
class JobAbort(Record):
    """An abort of running job id was asked for: it survives a restart."""

    OP: ClassVar[str] = "job.abort"
    id: int

    def to_wire(self) -> Wire:
        return {"op": self.OP, "id": self.id}

    @classmethod
    def from_wire(cls, d: Mapping[str, object]) -> Self:
        return cls(get_int(d, "id"))


@record
class JobEnd(Record):
    """Job id ended at time ended, in state done, aborted or failed."""

    OP: ClassVar[str] = "job.end"
    id: int
    state: str
    message: str
    ended: float

    def to_wire(self) -> Wire:
        return {"op": self.OP, "id": self.id, "state": self.state, "message": self.message,
                "ended": self.ended}

    @classmethod
    def from_wire(cls, d: Mapping[str, object]) -> Self:
        jid, state = get(d, "id"), get(d, "state")
        if type(jid) is not int or type(state) is not str or state not in JOB_STATES[1:]:
            raise StateError(f"bad job.end {jid!r} {state!r}")
        message = get_str(d, "message") if "message" in d else ""
        return cls(jid, state, message, get_time(d, "ended"))


# ---------------------------------------------------------------- snapshots (docs/snapshots.md)


@record
class SnapCreate(Record):
    """Snapshot "NAME@SNAP": a read-only copy of disk name's table, sharing its storage."""

    OP: ClassVar[str] = "snap.create"
    name: str
    snap: str
    ctime: float

    def to_wire(self) -> Wire:
        return {"op": self.OP, "name": self.name, "snap": self.snap, "ctime": self.ctime}

    @classmethod
    def from_wire(cls, d: Mapping[str, object]) -> Self:
        snap = get(d, "snap")
        if (type(snap) is not str or not snap or SNAP_SEP in snap or "/" in snap
                or "\0" in snap):
            raise StateError(f"bad snapshot name {snap!r}")
        return cls(get_str(d, "name"), snap, get_time(d, "ctime"))


@record
class SnapRm(Named):
    """Snapshot name ("DISK@SNAP") goes; what no other table of its family maps is freed."""

    OP: ClassVar[str] = "snap.rm"


@record
class SnapTrim(Record):
    """Snapshot name ("DISK@SNAP") is being removed (from its first snap.trim on, for
    good: nobody may open, clone or roll back to it, and the controller finishes the
    removal, after a restart too): its extents in [start, end) (bytes; start
    block-aligned, end block-aligned or its size) go, and what no other table of its
    family maps is freed. ``snap rm`` removes a snapshot in such steps of a bounded
    number of extents, then the snap.rm record drops what is left (docs/snapshots.md).
    An empty range (start == end) only marks it."""

    OP: ClassVar[str] = "snap.trim"
    name: str
    start: int
    end: int

    def to_wire(self) -> Wire:
        return {"op": self.OP, "name": self.name, "start": self.start, "end": self.end}

    @classmethod
    def from_wire(cls, d: Mapping[str, object]) -> Self:
        return cls(get_str(d, "name"), get_int(d, "start"), get_int(d, "end"))


@record
class SnapRollback(Record):
    """The disk of snapshot snap ("DISK@SNAP") takes the snapshot's content and size."""

    OP: ClassVar[str] = "snap.rollback"
    snap: str

    def to_wire(self) -> Wire:
        return {"op": self.OP, "snap": self.snap}

    @classmethod
    def from_wire(cls, d: Mapping[str, object]) -> Self:
        return cls(get_str(d, "snap"))


RECORDS: tuple[type[Record], ...] = (
    ContainerAdd, ContainerLabel, ContainerShare, ContainerFail, ContainerRestore, ContainerRm,
    DiskCreate, DiskMap, DiskTimes, DiskResize, DiskRm, DiskRename, DiskPlace, DiskQos,
    DiskUnmap,
    DiskClone, MoveStart, MoveMark, MoveCommit, MoveAbort, JobStart, JobAbort, JobEnd,
    SnapCreate, SnapRm, SnapTrim, SnapRollback, ControllerBoot, StorageRelocate, DiskPerms,
)
_BY_OP: dict[str, Callable[[Mapping[str, object]], Record]] = {
    c.OP: c.from_wire for c in RECORDS}


def decode(d: object) -> Record:
    """The record of wire map d, by its "op". Raises StateError for anything but a map,
    an unknown op, or a missing or bad field. Keys a record does not know (its "seq")
    are ignored."""
    if not isinstance(d, dict):
        raise StateError(f"a record is a map, not {type(d).__name__}")
    op = d.get("op")
    from_wire = _BY_OP.get(op) if isinstance(op, str) else None
    if from_wire is None:
        raise StateError(f"unknown record op {op!r}")
    return from_wire(d)
