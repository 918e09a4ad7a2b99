"""The tables of the controller's state: containers, disks (and snapshots), moves, jobs.

Plain data with the few derived values every reader wants (a container's usable and
used bytes, a disk's allocated bytes, their vdctl forms). ``State`` (state.py) owns
them and changes them only through ``apply``. No I/O, no trio.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .allocator import FreeSpace
from .bitmap import Bitmap
from .extents import ExtentMap
from .protocol import BLOCK_SIZE, LABEL_BYTES, former_name

_DISK_UIDS = itertools.count(1)

Piece = tuple[int, int, int, int]  # vstart, length, lun, offset (bytes): storage for a range


class StateError(ValueError):
    """A record that cannot be applied: in replay, this means corruption."""


def round_up(n: int, align: int = BLOCK_SIZE) -> int:
    return -(-n // align) * align


@dataclass
class Container:
    name: str
    lun: int
    path: str
    size: int
    created: bool  # virtfs created the file (and may delete it on rm)
    space: FreeSpace
    failed: bool = False  # container fail: every entry on it is `error` at the agents
    # its label's container id (docs/labels.md); None: added before labels, unlabelled
    uuid: str | None = None
    # shared between hosts: agents do its I/O with O_DIRECT (docs/fencing.md)
    shared: bool = False
    # a drain job off it ended done: new space avoids it until container restore
    drained: bool = False
    # whether a drain job runs off a LUN (State.is_draining, which derives it from the
    # jobs): set when the container enters the tables; never stored
    draining_of: Callable[[int], bool] = field(default=lambda lun: False, repr=False,
                                               compare=False)

    @property
    def draining(self) -> bool:
        """A drain job runs off this container: new space goes elsewhere (derived from
        the jobs, State.is_draining; kept here for the service's placement and vdctl)."""
        return self.draining_of(self.lun)

    @property
    def reserved(self) -> int:
        """Bytes at the container's start that hold no data: its label's block."""
        return LABEL_BYTES if self.uuid is not None else 0

    @property
    def end(self) -> int:
        """The end of the container's whole blocks (bytes): data lies in [reserved, end)."""
        return self.size - self.size % BLOCK_SIZE

    @property
    def usable(self) -> int:
        """Bytes disks may use: whole blocks, without the label's."""
        return self.end - self.reserved

    @property
    def used(self) -> int:
        return self.usable - self.space.free

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "lun": self.lun,
            "path": self.path,
            "size": self.size,
            "usable": self.usable,
            "used": self.used,
            "free": self.space.free,
            "created": self.created,
            "uuid": self.uuid,
            "shared": self.shared,
            "state": ("error" if self.failed else "draining" if self.draining
                      else "drained" if self.drained else "ok"),
        }


@dataclass
class Alt:
    """A segment being moved (docs/movement.md): its alternate location and bitmap.

    Kept in Disk.alts under the vstart of a stored extent flagged MOVING, which is the
    segment's primary location (L1) and never merges or splits while the move lasts.
    A set bit in bitmap (one per 4 KiB block of the extent) means that block's current
    data is at the alternate location (L2): lun, offset (bytes, block-aligned).
    """

    lun: int
    offset: int
    bitmap: Bitmap


JOB_KINDS = ("migrate", "drain")
JOB_STATES = ("running", "done", "aborted", "failed")
KEEP_FINISHED_JOBS = 100


@dataclass
class Job:
    """A background data movement, journaled so it resumes after a restart.

    kind "migrate": every extent of disk `disk` moves to container LUN `dst`.
    kind "drain": every extent on container LUN `src` moves off it (to `dst`, or
    wherever placement puts new space when dst is None).
    """

    id: int
    kind: str
    disk: str | None
    src: int | None
    dst: int | None
    started: float
    state: str = "running"
    ended: float | None = None
    message: str = ""
    aborting: bool = False  # an abort was asked for: a restart rolls back, not on
    # (disk, home, pin) before the job placed the disk's new space elsewhere: an abort
    # puts them back (records.JobStart.placed)
    placed: list[tuple[str, int, int | None]] = field(default_factory=list)
    rate: int = 0  # the copier's limit, bytes/s (0: none; records.JobStart.rate)

    def to_wire(self) -> list[object]:
        """The job as a list; placed only when there are any, rate only when set (so a
        checkpoint without them is written byte for byte as before they existed)."""
        out: list[object] = [self.id, self.kind, self.disk, self.src, self.dst, self.started,
                             self.state, self.ended, self.message, self.aborting]
        if self.placed or self.rate:
            out.append([list(p) for p in self.placed])
        if self.rate:
            out.append(self.rate)
        return out

    @classmethod
    def from_wire(cls, w: object) -> Job:
        """A job from to_wire()'s list (9 items before aborts were journaled, 10 before
        placements were, 11 before rates were)."""
        if not isinstance(w, list) or len(w) not in (9, 10, 11, 12):
            raise StateError(f"bad job {w!r}")
        placed = w[10] if len(w) >= 11 else []
        rate = w[11] if len(w) == 12 else 0
        if type(rate) is not int or rate < 0:
            raise StateError(f"bad job rate {rate!r}")
        if not isinstance(placed, list) or not all(
                isinstance(p, list) and len(p) == 3 and type(p[0]) is str
                and type(p[1]) is int and (p[2] is None or type(p[2]) is int)
                for p in placed):
            raise StateError(f"bad job placements {placed!r}")
        job = cls(*w[:10])
        job.placed = [(p[0], p[1], p[2]) for p in placed]
        job.rate = rate
        return job


# a disk's QoS limits (docs/qos.md): ops/s and bytes/s, for all I/O or reads or writes
QOS_KEYS = ("iops", "bps", "read_iops", "read_bps", "write_iops", "write_bps")


@dataclass
class Disk:
    name: str
    size: int
    segment_size: int
    thick: bool
    pin: int | None  # allocate only on this LUN, if set
    home: int  # preferred LUN for thin allocation
    ctime: float
    extents: ExtentMap = field(default_factory=ExtentMap)
    alts: dict[int, Alt] = field(default_factory=dict)
    epoch: int = 1
    # this process's identity of the disk (never persisted, never reused): what agents'
    # opens, locks and restrictions are keyed by, so renames and re-creations of a name
    # cannot mix two disks up
    uid: int = field(default_factory=lambda: next(_DISK_UIDS), compare=False, repr=False)
    # snapshots and clones (docs/snapshots.md): tables of one family (a disk, its
    # snapshots, their clones, ...) may share storage, always at the same vstart;
    # origin: the snapshot a clone was made from; a snapshot's parent: its disk
    family: int = 0
    origin: str | None = None
    parent: str | None = None  # set on snapshots only (read-only tables)
    # a snapshot whose removal began (snap.trim records): it is never opened, cloned or
    # rolled back to again, and the controller finishes removing it (docs/snapshots.md)
    removing: bool = False
    # times kept by the agents (disk.times records; 0.0: not set, the creation time
    # stands): the last change of the content or size, and of the content or metadata
    mtime: float = 0.0
    stime: float = 0.0
    # QoS limits (disk.qos records; docs/qos.md): QOS_KEYS -> ops/s or bytes/s; agents
    # enforce them. Empty: unlimited
    qos: dict[str, int] = field(default_factory=dict)
    # owner uid, group gid and mode (disk.perms records; docs/permissions.md): None
    # until set, and a mount then shows its own uid, gid and 0644 (controller/perms.py)
    owner: int | None = None
    group: int | None = None
    mode: int | None = None

    @property
    def allocated(self) -> int:
        return self.extents.mapped_bytes

    @property
    def is_snapshot(self) -> bool:
        return self.parent is not None

    def to_dict(self, luns: dict[int, Container]) -> dict[str, object]:
        return {
            "name": self.name,
            "size": self.size,
            "segment_size": self.segment_size,
            "provisioning": "thick" if self.thick else "thin",
            "allocated": self.allocated,
            "extents": len(self.extents),
            "container": luns[self.pin].name if self.pin is not None else None,
            "home": luns[self.home].name if self.home in luns else None,
            "epoch": self.epoch,
            "ctime": self.ctime,
            "mtime": self.mtime or self.ctime,
            "changed": self.stime or self.ctime,
            # unlinked while open (protocol.DELETED_PREFIX): the name it had
            "deleted": former_name(self.name),
            "origin": self.origin,
            "qos": dict(self.qos),
            "owner": self.owner,
            "group": self.group,
            "mode": self.mode,
        }


def check_pieces(luns: Mapping[int, Container], d: Disk, pieces: list[Piece],
                 size: int) -> None:
    """Refuse pieces (vstart, length, lun, offset: bytes) that cannot all be mapped into
    d, were it size bytes long: StateError, before anything changes.

    State.apply() must change nothing when it raises: a refused live record is not
    journaled, so a half-applied one would make the live table drift from replay.
    """
    for vstart, length, lun, offset in pieces:
        c = luns.get(lun)
        if c is None:
            raise StateError(f"no container with LUN {lun}")
        if vstart < 0 or vstart % BLOCK_SIZE or offset % BLOCK_SIZE or length <= 0:
            raise StateError(f"misaligned piece {vstart}+{length} -> {lun}:{offset}")
        if vstart + length > size:
            raise StateError(f"piece {vstart}+{length} runs past disk {d.name!r}")
        if length % BLOCK_SIZE and vstart + length != size:
            raise StateError(f"short piece {vstart}+{length} is not at the end of the disk")
        if not c.space.is_free(offset, round_up(length)):
            raise StateError(f"piece {vstart}+{length} does not fit the table: "
                             f"{lun}:{offset}+{round_up(length)} is not free")
        if not d.extents.is_gap(vstart, vstart + length):
            raise StateError(f"piece {vstart}+{length} does not fit the table: "
                             "already mapped")
    if len(pieces) < 2:
        return
    for key in (lambda p: (0, p[0]), lambda p: (p[2], p[3])):  # virtual, then physical
        prev: tuple[int, int] | None = None
        for p in sorted(pieces, key=key):
            k = key(p)
            if prev is not None and k[0] == prev[0] and k[1] < prev[1]:
                raise StateError(f"piece {p[0]}+{p[1]} does not fit the table: pieces "
                                 "of one record overlap")
            prev = (k[0], k[1] + round_up(p[1]))
