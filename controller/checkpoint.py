"""The checkpoint: the whole State as of one record, as a file in the state dir.

``checkpoint`` is a sequence of frames (``frames``) of about 512 KiB each (format 2):
a header (format, seq, next_lun, boot, the jobs, the containers with their number of
free ranges, the number of disks), the containers' free lists in slices, then per
disk a frame with its fields and counts, its extents as five packed columns (vstart,
length, lun, offset, flags, as ``ExtentMap.to_wire``) in slices, its alternates, and
last an end frame with the counts, so a truncated file is detected. Written
tmp -> fsync -> rename -> fsync(dir). The older format 1 (one frame holding the whole
state as one map, which stops working past the 64 MiB frame cap) is still read, not
written. Any damage is refused with ``JournalCorrupt`` naming the file.

A container's and a disk's persisted fields are listed once (``CONTAINER_FIELDS``,
``DISK_FIELDS``, ``LINEAGE_FIELDS``, ``TIME_FIELDS``), for the writer and both readers.
Encoding and decoding do no I/O; the file functions below them block.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from typing import IO, Any

from . import frames
from .allocator import FreeSpace
from .bitmap import Bitmap
from .extents import ExtentMap, ExtentSnapshot
from .frames import JournalCorrupt
from .fsutil import fsync_dir, write_all
from .records_attrs import MAX_ID, MODE_BITS
from .state import State
from .tables import QOS_KEYS, Alt, Container, Disk, Job, StateError

CHECKPOINT = "checkpoint"
FORMAT_1 = 1  # one frame: the whole state as one map (read only)
FORMAT_2 = 2  # Snapshot.parts(): a sequence of bounded parts
# Target size of one checkpoint frame. The worker thread holds the GIL while it
# packs one, so this bounds how long the event loop may wait for it: measured
# longest heartbeat gaps of 20-30 ms with 4 MiB frames, 6-10 ms with 512 KiB.
CHECKPOINT_PART_BYTES = 512 << 10

# The persisted fields, in their on-disk order (the order is part of the format:
# a checkpoint is written byte for byte as before). A container: these, then its
# free-list cursor and free ranges. A disk or snapshot table: DISK_FIELDS, its
# extents and alternates, LINEAGE_FIELDS, then TIME_FIELDS only when a time is set.
CONTAINER_FIELDS = ("name", "lun", "path", "size", "created", "failed", "draining", "drained")
# derived from the jobs (State.is_draining): written for older controllers, not read back
_DERIVED = ("draining",)
# written only when set (a state that never uses them checkpoints byte for byte as
# before they existed); read back with their default when absent
_SPARSE = {"drained": False}
DISK_FIELDS = ("name", "size", "segment_size", "thick", "pin", "home", "ctime", "epoch")
LINEAGE_FIELDS = ("family", "origin", "parent")
TIME_FIELDS = ("mtime", "stime")
# container fields older checkpoints may lack, and their meaning then
_CONTAINER_DEFAULTS = {FORMAT_1: {"failed": False, "draining": False},
                       FORMAT_2: {"draining": False}}

# an alternate location on the wire: vstart, lun, offset, bitmap blocks, bitmap bytes
AltRow = tuple[int, int, int, int, bytes]

# bytes per item on the wire, to cut parts to size
_EXTENT_WIRE = 33
_FREE_WIRE = 16


# ---------------------------------------------------------------- fields


def _fields(obj: Container | Disk, names: tuple[str, ...]) -> dict[str, object]:
    return {k: getattr(obj, k) for k in names}


def _disk_tail(d: Disk) -> dict[str, object]:
    """A table's lineage, and its times only when set (older checkpoints lack them)."""
    times = _fields(d, TIME_FIELDS) if d.mtime or d.stime else {}
    qos = {"qos": dict(d.qos)} if d.qos else {}  # (older checkpoints lack it)
    perms = ({"perms": [d.owner, d.group, d.mode]}  # (and these, docs/permissions.md)
             if (d.owner, d.group, d.mode) != (None, None, None) else {})
    removing = {"removing": True} if d.removing else {}  # (a snapshot: R.SnapTrim)
    return {**_fields(d, LINEAGE_FIELDS), **times, **qos, **perms, **removing}


def _alt_wire(vstart: int, a: Alt) -> AltRow:
    return (vstart, a.lun, a.offset, a.bitmap.nblocks, a.bitmap.to_bytes())


def _labelled(c: Container) -> dict[str, object]:
    """A container's label id and its shared flag, only when set (older checkpoints
    lack them)."""
    return {**({} if c.uuid is None else {"uuid": c.uuid}),
            **({"shared": True} if c.shared else {})}


def _container(cw: dict[str, Any], space: FreeSpace, fmt: int, s: State) -> Container:
    defaults = {**_CONTAINER_DEFAULTS[fmt], **_SPARSE}
    c = Container(space=space, draining_of=s.is_draining, **{
        k: cw.get(k, defaults[k]) if k in defaults else cw[k]
        for k in CONTAINER_FIELDS if k not in _DERIVED})
    if type(c.drained) is not bool:
        raise StateError(f"checkpoint: container {c.name!r} has a bad drained {c.drained!r}")
    uuid = cw.get("uuid")
    if uuid is not None and not (isinstance(uuid, str) and len(uuid) == 32):
        raise StateError(f"checkpoint: container {c.name!r} has a bad uuid {uuid!r}")
    c.uuid = uuid
    shared = cw.get("shared", False)
    if type(shared) is not bool:
        raise StateError(f"checkpoint: container {c.name!r} has a bad shared {shared!r}")
    c.shared = shared
    return c


def _installation(h: dict[str, Any]) -> str | None:
    inst = h.get("installation")
    if inst is not None and not (isinstance(inst, str) and len(inst) == 32):
        raise StateError(f"checkpoint: bad installation id {inst!r}")
    return inst


def _disk(dw: dict[str, Any], extents: ExtentMap) -> Disk:
    """A table from its fields (lineage, times and alternates are loaded after)."""
    d = Disk(extents=extents, **{k: dw[k] for k in DISK_FIELDS})
    for key in TIME_FIELDS:
        t = dw.get(key, 0.0)
        if type(t) not in (int, float):
            raise StateError(f"checkpoint: disk {d.name!r} has a bad {key} {t!r}")
        setattr(d, key, float(t))
    qos = dw.get("qos", {})
    if not isinstance(qos, dict) or not all(
            k in QOS_KEYS and type(v) is int and v > 0 for k, v in qos.items()):
        raise StateError(f"checkpoint: disk {d.name!r} has bad QoS limits {qos!r}")
    d.qos = dict(qos)
    perms = dw.get("perms", [None, None, None])
    if not (isinstance(perms, list) and len(perms) == 3 and all(
            v is None or (type(v) is int and 0 <= v <= hi)
            for v, hi in zip(perms, (MAX_ID, MAX_ID, MODE_BITS), strict=True))):
        raise StateError(f"checkpoint: disk {d.name!r} has bad permissions {perms!r}")
    d.owner, d.group, d.mode = perms
    removing = dw.get("removing", False)
    if type(removing) is not bool:
        raise StateError(f"checkpoint: disk {d.name!r} has a bad removing {removing!r}")
    d.removing = removing
    return d


def _load_alts(d: Disk, rows: list[Any]) -> None:
    for vs, lun, off, nblocks, bits in rows:
        d.alts[vs] = Alt(lun, off, Bitmap(nblocks, bits))


def _add_table(s: State, d: Disk, w: dict[str, Any]) -> None:
    """Load a disk or snapshot table's lineage from its checkpoint form (tables
    written before snapshots existed get a family of their own) and add it to s."""
    fam = w.get("family")
    if fam is None:
        fam = s.next_family
        s.next_family += 1
    d.family = _int(fam, "family")
    d.origin, d.parent = w.get("origin"), w.get("parent")
    (s.snaps if d.parent is not None else s.disks)[d.name] = d


def _int(v: object, what: str) -> int:
    if type(v) is not int:
        raise StateError(f"checkpoint: {what} is not an integer: {v!r}")
    return v


def _load_jobs(s: State, w: dict[str, Any]) -> None:
    s.next_job = _int(w.get("next_job", 1), "next_job")
    for jw in w.get("jobs", []):
        j = Job.from_wire(jw)
        s.jobs[j.id] = j


# ---------------------------------------------------------------- format 2


class Snapshot:
    """A State frozen for a checkpoint; release() it when done.

    Taking it costs O(containers + disks + extent chunks + free ranges + alternates)
    on the caller's thread: container and disk fields, free lists and alternates are
    copied; extents are shared copy-on-write with the live maps. parts() reads only
    those copies, so it may run in a worker thread while the live state changes.
    release() ends the sharing; until then the live maps pay one chunk copy (at most
    about 34 KiB) on the first change of each shared chunk.
    """

    def __init__(self, state: State):
        self.seq = state.seq
        containers: list[dict[str, object]] = []
        self._header: dict[str, object] = {
            "format": FORMAT_2, "part": "header", "seq": state.seq,
            "next_lun": state.next_lun, "boot": state.boot, "containers": containers,
            "next_job": state.next_job, "jobs": [j.to_wire() for j in state.jobs.values()],
            "disks": len(state.disks) + len(state.snaps), "next_family": state.next_family,
        }
        if state.installation is not None:  # written only when set: older files stay as they were
            self._header["installation"] = state.installation
        self._free: list[tuple[int, bytes, bytes]] = []
        for c in state.containers.values():
            starts, lens = c.space.to_wire()  # copies
            containers.append({
                **{k: v for k, v in _fields(c, CONTAINER_FIELDS).items()
                   if k not in _SPARSE or v != _SPARSE[k]},
                **_labelled(c), "cursor": c.space.cursor,
                "free": len(starts) // 8,
            })
            self._free.append((c.lun, starts, lens))
        self._disks: list[tuple[dict[str, object], ExtentSnapshot, list[AltRow]]] = []
        try:
            for d in (*state.disks.values(), *state.snaps.values()):
                ext = d.extents.snapshot()
                alts = [_alt_wire(vs, a) for vs, a in d.alts.items()]
                meta = {"part": "disk", **_fields(d, DISK_FIELDS),
                        "extents": ext.count, "alts": len(alts), **_disk_tail(d)}
                self._disks.append((meta, ext, alts))
        except BaseException:
            self.release()
            raise
        self.extents = sum(ext.count for _m, ext, _a in self._disks)

    def parts(self, max_bytes: int = 4 << 20) -> Iterator[dict[str, object]]:
        """The checkpoint as msgpack-able maps, each about max_bytes or less (plus a
        little per-part overhead; a header grows with the number of containers):
        header, the free lists, then per disk its fields, extents and alternates,
        and an end part with the counts (so a truncated file is detected)."""
        nparts = 1
        yield self._header
        per = max(1, max_bytes // _FREE_WIRE)
        for lun, starts, lens in self._free:
            for k in range(0, len(starts), 8 * per):
                nparts += 1
                yield {"part": "free", "lun": lun,
                       "cols": [starts[k : k + 8 * per], lens[k : k + 8 * per]]}
        for meta, ext, alts in self._disks:
            nparts += 1
            yield meta
            for cols in ext.parts(max(1, max_bytes // _EXTENT_WIRE)):
                nparts += 1
                yield {"part": "extents", "cols": cols}
            batch: list[AltRow] = []
            size = 0
            for a in alts:
                batch.append(a)
                size += 48 + len(a[4])
                if size >= max_bytes:
                    nparts += 1
                    yield {"part": "alts", "alts": batch}
                    batch, size = [], 0
            if batch:
                nparts += 1
                yield {"part": "alts", "alts": batch}
        yield {"part": "end", "seq": self.seq, "disks": len(self._disks),
               "extents": self.extents, "parts": nparts}

    def release(self) -> None:
        """End the copy-on-write sharing with the live extent maps (idempotent)."""
        for _m, ext, _a in self._disks:
            ext.release()


def from_parts(parts: Iterable[object]) -> State:
    """The state from the parts of a format-2 checkpoint (Snapshot.parts()), header
    first. Consumes the iterable up to the end part; raises StateError if a part is
    malformed, out of place, or missing (a truncated checkpoint), or if anything
    follows the end part."""
    it = iter(parts)
    s = State()
    count = 0

    def nxt(kind: str) -> dict[str, Any]:
        nonlocal count
        p = next(it, None)
        if p is None:
            raise StateError(f"checkpoint ends early: part {count + 1} ({kind}) is missing")
        count += 1
        if not isinstance(p, dict) or p.get("part") != kind:
            got = p.get("part") if isinstance(p, dict) else type(p).__name__
            raise StateError(f"checkpoint part {count}: expected {kind}, found {got!r}")
        return p

    try:
        h = nxt("header")
        if h.get("format") != FORMAT_2:
            raise StateError(f"checkpoint has an unknown format {h.get('format')!r}")
        s.seq = _int(h["seq"], "seq")
        s.next_lun = _int(h["next_lun"], "next_lun")
        s.boot = _int(h["boot"], "boot")
        s.installation = _installation(h)
        _load_jobs(s, h)
        ndisks = _int(h["disks"], "disks")
        s.next_family = _int(h.get("next_family", 1), "next_family")
        for cw in h["containers"]:
            nfree = _int(cw["free"], "free")
            starts, lens = bytearray(), bytearray()
            while len(starts) < 8 * nfree:  # 8 bytes per start
                p = nxt("free")
                if p["lun"] != cw["lun"]:
                    raise StateError(f"checkpoint part {count}: free space of LUN "
                                     f"{p['lun']!r} where LUN {cw['lun']!r} was due")
                a, b = p["cols"]
                starts += a
                lens += b
            if len(starts) != 8 * nfree or len(lens) != 8 * nfree:
                raise StateError(f"checkpoint: container {cw['name']!r} has the wrong "
                                 "number of free ranges")
            space = FreeSpace.from_wire(cw["size"], [bytes(starts), bytes(lens)],
                                        cw["cursor"])
            c = _container(cw, space, FORMAT_2, s)
            if c.name in s.containers or c.lun in s.luns:
                raise StateError(f"checkpoint: container {c.name!r} twice")
            s.containers[c.name] = c
            s.luns[c.lun] = c
        total = 0
        for _ in range(ndisks):
            dw = nxt("disk")
            m = ExtentMap()
            n = _int(dw["extents"], "extents")
            while len(m) < n:
                m.extend_wire(nxt("extents")["cols"])
            if len(m) != n:
                raise StateError(f"checkpoint: disk {dw['name']!r} has {len(m)} extents, "
                                 f"its header says {n}")
            total += n
            d = _disk(dw, m)
            nalts = _int(dw["alts"], "alts")
            while len(d.alts) < nalts:
                _load_alts(d, nxt("alts")["alts"])
            if len(d.alts) != nalts:
                raise StateError(f"checkpoint: disk {d.name!r} has the wrong number of "
                                 "alternates")
            if d.name in s.disks or d.name in s.snaps:
                raise StateError(f"checkpoint: disk {d.name!r} twice")
            _add_table(s, d, dw)
        end = nxt("end")
        if (end["seq"], end["disks"], end["extents"], end["parts"]) != (
                s.seq, ndisks, total, count - 1):
            raise StateError("checkpoint: the end part's counts do not match its contents")
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, StateError):
            raise
        raise StateError(f"checkpoint part {count} is malformed: {e!r}") from None
    extra = next(it, None)
    if extra is not None:
        raise StateError(f"checkpoint: data after the end part (part {count + 1})")
    return s


# ---------------------------------------------------------------- format 1 (read only)


def from_format1(w: dict[str, Any]) -> State:
    """The state from a format-1 checkpoint's one map (as written before format 2;
    "boot", "jobs", "failed", "draining", "cursor", lineage and times may be absent).

    Raises StateError if the map is malformed."""
    if not isinstance(w, dict) or w.get("format") != FORMAT_1:
        raise StateError("checkpoint has an unknown format")
    s = State()
    try:
        s.seq = w["seq"]
        s.next_lun = w["next_lun"]
        s.boot = _int(w.get("boot", 0), "boot")
        _load_jobs(s, w)
        for cw in w["containers"]:
            space = FreeSpace.from_wire(cw["size"], cw["free"], cw.get("cursor", 0))
            c = _container(cw, space, FORMAT_1, s)
            s.containers[c.name] = c
            s.luns[c.lun] = c
        s.next_family = _int(w.get("next_family", 1), "next_family")
        for dw in w["disks"]:
            d = _disk(dw, ExtentMap.from_wire(dw["extents"]))
            _load_alts(d, dw["alts"])
            _add_table(s, d, dw)
    except (KeyError, TypeError, ValueError) as e:
        raise StateError(f"checkpoint is malformed: {e!r}") from None
    return s


# ---------------------------------------------------------------- the file


def part_bytes() -> int:
    """Target payload size of one checkpoint frame: CHECKPOINT_PART_BYTES, or less if
    the frame cap (frames.MAX_JOURNAL_RECORD) is lower, leaving room for overhead."""
    return max(1, min(CHECKPOINT_PART_BYTES, frames.MAX_JOURNAL_RECORD // 2))


def checkpoint_frames(snap: Snapshot) -> Iterator[bytes]:
    """The frames of a format-2 checkpoint of snap (lazy: encodes as it goes).

    Raises CodecError if a part exceeds the frame cap (a header with a great many
    containers, say)."""
    for part in snap.parts(part_bytes()):
        yield frames.encode(part)


class CheckpointFile:
    """A checkpoint being written to ``checkpoint.tmp``; commit() makes it the checkpoint.

    Every method blocks (file I/O): call them from a worker thread on the loop.
    """

    def __init__(self, state_dir: str, name: str = CHECKPOINT):
        self.path = os.path.join(state_dir, name)
        self.tmp = self.path + ".tmp"
        self.bytes = 0
        self._fd: int | None = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def write_some(self, frames: Iterator[bytes], budget: int, *, sync: bool = False) -> bool:
        """Write frames until about budget bytes are written; True once frames is done.

        sync: fdatasync what was written, so that dirty checkpoint data never piles up
        (on ext4, a journal fdatasync meanwhile would wait for all of it to reach disk).
        """
        assert self._fd is not None
        start = self.bytes
        more = False
        for frame in frames:
            write_all(self._fd, frame)
            self.bytes += len(frame)
            if self.bytes - start >= budget:
                more = True
                break
        if sync:
            os.fdatasync(self._fd)
        return not more

    def commit(self) -> None:
        """fsync, rename over the checkpoint, fsync the directory."""
        assert self._fd is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        os.replace(self.tmp, self.path)
        fsync_dir(os.path.dirname(self.path) or ".")

    def abort(self) -> None:
        """Drop the partial file (idempotent; the old checkpoint stays)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass


def write_checkpoint(state_dir: str, state: State, name: str = CHECKPOINT) -> int:
    """Write state as the checkpoint of state_dir (the file name: a group's are
    named by term and seq, controller/groupstore.py), blocking until it is durable.

    Returns the file's size in bytes. For a live controller use the journal's
    background checkpoint instead: this encodes everything on the calling thread.
    """
    snap = Snapshot(state)
    try:
        f = CheckpointFile(state_dir, name)
        try:
            f.write_some(checkpoint_frames(snap), 1 << 62)
            f.commit()
        finally:
            f.abort()
    finally:
        snap.release()
    return f.bytes


def _read_frames(f: IO[bytes], path: str) -> Iterator[object]:
    """Decode the frames of an open checkpoint file one at a time (streaming).

    Raises JournalCorrupt (naming path and the byte offset) at a damaged or
    truncated frame."""
    reader = frames.FrameReader(f)
    yield from reader
    fault = reader.fault
    if fault is None:
        return
    at = f"{path}: checkpoint is {{}} at byte offset {fault.offset}"
    if fault.kind == frames.TRUNCATED:
        raise JournalCorrupt(at.format("truncated"))
    if fault.kind == frames.BAD_PAYLOAD:
        raise JournalCorrupt(at.format("damaged") + f": {fault.detail}")
    raise JournalCorrupt(at.format("damaged") + f" ({fault.kind})")


def load_checkpoint(state_dir: str, name: str = CHECKPOINT) -> State:
    """The state in state_dir's checkpoint file name (an empty State if there is none).

    Reads format 2 (many frames) frame by frame, so the file is never in memory
    whole, and format 1 (one frame). Raises JournalCorrupt, naming the file, if it
    is damaged, truncated or does not describe a consistent state.
    """
    path = os.path.join(state_dir, name)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return State()
    with f:
        parts = _read_frames(f, path)
        try:
            first = next(parts, None)
            if first is None:
                raise JournalCorrupt(f"{path}: checkpoint is empty")
            if isinstance(first, dict) and first.get("format") == FORMAT_1:
                if next(parts, None) is not None:
                    raise JournalCorrupt(f"{path}: data after a format-1 checkpoint")
                return from_format1(first)
            return from_parts(itertools.chain([first], parts))
        except StateError as e:
            raise JournalCorrupt(f"{path}: {e}") from None
