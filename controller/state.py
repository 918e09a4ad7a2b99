"""The authoritative ("second") table: containers, disks and their segment maps.

``State.apply(record)`` is the only mutator. The service builds a record
(having made every choice: LUN ids, placements, timestamps), applies it, and
the journal persists it; replay feeds the same records through the same
``apply``, so a restarted controller cannot drift from the live one. This
module does no I/O and imports no trio.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from . import perms, sharing, state_moves, state_relocate
from . import records as R
from .allocator import AllocError, FreeSpace
from .extents import MAX_EXTENT, MOVING, Extent, ExtentError
from .protocol import BLOCK_SIZE, LABEL_BYTES, is_snapshot_name, snapshot_name, split_snapshot_name
from .records import RECORDS, Piece, Record, decode
from .sharing import unshared_blocks  # noqa: F401 - controller/service/ imports it from here
from .tables import (
    JOB_KINDS,
    JOB_STATES,
    KEEP_FINISHED_JOBS,
    Container,
    Disk,
    Job,
    StateError,
    check_pieces,
    round_up,
)
from .units import human


class State:
    def __init__(self) -> None:
        self.containers: dict[str, Container] = {}
        self.luns: dict[int, Container] = {}
        self.disks: dict[str, Disk] = {}
        self.next_lun = 1
        self.seq = 0  # sequence number of the last applied record
        # controller starts so far ("controller.boot" records): a persisted counter
        # that never goes back, unlike the wall clock, for version stamps
        self.boot = 0
        self.jobs: dict[int, Job] = {}  # running ones, and the last finished ones
        self.next_job = 1
        self.snaps: dict[str, Disk] = {}  # "DISK@SNAP" -> the snapshot's read-only table
        self.next_family = 1
        # the installation id that labels its containers (docs/labels.md), chosen at the
        # first start with labels; None for a state from before them
        self.installation: str | None = None

    # ------------------------------------------------------------ lookups
    def container(self, name: str) -> Container:
        c = self.containers.get(name)
        if c is None:
            raise StateError(f"no such container: {name!r}")
        return c

    def disk(self, name: str) -> Disk:
        d = self.disks.get(name)
        if d is None:
            raise StateError(f"no such disk: {name!r}")
        return d

    def table(self, name: str) -> Disk:
        """A disk or a snapshot ("DISK@SNAP") by name; StateError if neither exists."""
        t = self.snaps.get(name) if is_snapshot_name(name) else self.disks.get(name)
        if t is None:
            raise StateError(f"no such disk or snapshot: {name!r}")
        return t

    def family(self, fam: int) -> list[Disk]:
        """Every table (disks, snapshots, clones) of a family: those that may share."""
        return [t for t in (*self.disks.values(), *self.snaps.values()) if t.family == fam]

    def referenced(self, fam: int, vstart: int, vend: int, lun: int, offset: int,
                   skip: Disk | None = None) -> list[tuple[int, int]]:
        """Parts [lo, hi) of [vstart, vend) whose storage (lun, offset + (v - vstart))
        another table of family fam (not skip) maps, at the same vstart: shared storage.
        Tables share only by having been copied from one another (snapshot, clone,
        rollback), so a shared block is always at the same vstart in every table."""
        others = [t for t in self.family(fam) if t is not skip]
        return sharing.referenced(others, vstart, vend, lun, offset)

    def referenced_all(self, fam: int, pieces: list[Extent],
                       skip: Disk | None = None) -> list[list[tuple[int, int]]]:
        """referenced() for each of pieces (in vstart order, not overlapping), at once
        (sharing.referenced_all: one ordered walk of each other table)."""
        return sharing.referenced_all([t for t in self.family(fam) if t is not skip], pieces)

    def release_unshared(self, fam: int, pieces: list[Extent]) -> None:
        """Free the storage of pieces (removed from their table already) that no other
        table of family fam maps (sharing.release_unshared)."""
        sharing.release_unshared(self.family(fam), self.luns, pieces)

    def draining_luns(self) -> set[int]:
        """LUNs a drain job runs off (new space goes elsewhere): derived from the jobs,
        never stored (a checkpoint writes it only for older controllers to read)."""
        return {j.src for j in self.jobs.values()
                if j.kind == "drain" and j.state == "running" and j.src is not None}

    def is_draining(self, lun: int) -> bool:
        """Whether a drain job runs off LUN lun (draining_luns, for one LUN)."""
        return any(j.src == lun and j.kind == "drain" and j.state == "running"
                   for j in self.jobs.values())

    def lun_users(self, lun: int) -> Iterator[tuple[Disk, Extent]]:
        """(table, extent) of every disk and snapshot extent stored on LUN lun."""
        for d in (*self.disks.values(), *self.snaps.values()):
            for e in d.extents:
                if e.lun == lun:
                    yield d, e

    # ------------------------------------------------------------ the mutator
    def apply(self, rec: Record, seq: int | None = None) -> None:
        """Apply rec, the record numbered seq in the journal (None: not journaled).

        Raises StateError, with nothing changed, if rec does not fit the tables.
        """
        handler = _HANDLERS.get(type(rec))
        if handler is None:
            raise StateError(f"unknown record {rec!r}")
        try:
            handler(self, rec)
        except (KeyError, TypeError) as e:
            raise StateError(f"malformed {rec.OP} record: {e!r}") from None
        except (ExtentError, AllocError) as e:
            raise StateError(f"{rec.OP} record does not fit the table: {e}") from None
        if seq is not None:
            self.seq = seq

    def apply_wire(self, d: dict[str, object]) -> None:
        """Apply a record in its wire form (replay): records.decode, then apply with
        its "seq". StateError if it is malformed (or not a map) or does not fit."""
        rec = decode(d)  # checks that d is a dict first
        seq = d.get("seq")
        self.apply(rec, seq if type(seq) is int else None)

    def _map(self, d: Disk, pieces: list[Piece]) -> None:
        """Map pieces (vstart, length, lun, offset) into d and take their space."""
        check_pieces(self.luns, d, pieces, d.size)
        for vstart, length, lun, offset in pieces:
            c = self.luns[lun]
            c.space.take(offset, round_up(length))
            pos = 0
            while pos < length:  # respect MAX_EXTENT even for a huge thick piece
                n = min(MAX_EXTENT, length - pos)
                d.extents.insert(vstart + pos, n, lun, offset + pos)
                pos += n
        d.epoch += 1

    def _unmap(self, d: Disk, start: int, end: int) -> list[Extent]:
        """Unmap [start, end) (block-aligned start) of d and free the space.

        A segment being moved goes with both its locations. One may be cut only at its
        tail (a shrink): its bitmap and alternate location shrink with it. Cutting
        off its head would move the key of its Alt: StateError.
        """
        if start % BLOCK_SIZE:
            raise StateError(f"unaligned unmap start {start}")
        tail = d.extents.find(end - 1) if end > start else None
        if tail is not None and tail.flags & MOVING and tail.vend > end:
            raise StateError(f"unmap {start}..{end} would cut the head off the moving "
                             f"segment at {tail.vstart}")
        head = d.extents.find(start) if end > start else None
        if head is not None and head.flags & MOVING and head.vstart < start:
            a = d.alts[head.vstart]
            keep = (start - head.vstart) // BLOCK_SIZE
            self.luns[a.lun].space.release(a.offset + keep * BLOCK_SIZE,
                                           (a.bitmap.nblocks - keep) * BLOCK_SIZE)
            a.bitmap = a.bitmap.slice(0, keep)
        removed = d.extents.remove_range(start, end)
        self.release_unshared(d.family, removed)
        for e in removed:
            if e.flags & MOVING and e.vstart in d.alts:  # the whole moving segment
                a = d.alts.pop(e.vstart)
                self.luns[a.lun].space.release(a.offset, a.bitmap.nblocks * BLOCK_SIZE)
        d.epoch += 1
        return removed

    def _container_add(self, rec: R.ContainerAdd) -> None:
        name, lun, size = rec.name, rec.lun, rec.size
        if name in self.containers or lun in self.luns:
            raise StateError(f"container {name!r} / LUN {lun} already exists")
        if rec.uuid is not None and self.installation is None:
            raise StateError(f"container {name!r} has a label but the state no installation")
        c = Container(name, lun, rec.path, size, rec.created, FreeSpace(size),
                      draining_of=self.is_draining)
        if rec.uuid is not None:
            c.space.take(0, LABEL_BYTES)
            c.uuid = rec.uuid
        c.shared = rec.shared
        self.containers[name] = c
        self.luns[lun] = c
        self.next_lun = max(self.next_lun, lun + 1)

    def _container_label(self, rec: R.ContainerLabel) -> None:
        c = self.container(rec.name)
        if c.uuid is not None:
            raise StateError(f"container {c.name!r} is labelled already")
        if self.installation is None:
            raise StateError("a container label before the installation id")
        if not c.space.is_free(0, LABEL_BYTES):
            raise StateError(f"container {c.name!r}: its first block holds data")
        c.space.take(0, LABEL_BYTES)
        c.uuid = rec.uuid

    def _container_share(self, rec: R.ContainerShare) -> None:
        self.container(rec.name).shared = rec.shared

    def _container_fail(self, rec: R.ContainerFail) -> None:
        self.container(rec.name).failed = True

    def _container_restore(self, rec: R.ContainerRestore) -> None:
        """A failed container works again; a drained one takes new space again."""
        c = self.container(rec.name)
        c.failed = c.drained = False

    def _container_rm(self, rec: R.ContainerRm) -> None:
        c = self.container(rec.name)
        if c.used:
            raise StateError(f"container {c.name!r} still holds {human(c.used)}")
        del self.containers[c.name]
        del self.luns[c.lun]

    def _disk_create(self, rec: R.DiskCreate) -> None:
        name = rec.name
        if name in self.disks:
            raise StateError(f"disk {name!r} already exists")
        d = Disk(
            name=name,
            size=rec.size,
            segment_size=rec.segment_size,
            thick=rec.thick,
            pin=rec.pin,
            home=rec.home,
            ctime=rec.ctime,
            family=self.next_family,
        )
        self._map(d, rec.pieces)
        self.disks[name] = d
        self.next_family += 1

    def _disk_times(self, rec: R.DiskTimes) -> None:
        """An agent's times of a disk (its last write, size change or utimensat)."""
        d = self.disk(rec.name)
        d.mtime, d.stime = rec.mtime, rec.stime

    def _disk_map(self, rec: R.DiskMap) -> None:
        self._map(self.disk(rec.name), rec.pieces)

    def _disk_resize(self, rec: R.DiskResize) -> None:
        d = self.disk(rec.name)
        new = rec.size
        pieces = rec.pieces
        check_pieces(self.luns, d, pieces, new)  # before anything changes
        if new < d.size and d.size:
            cut = round_up(new)
            self._unmap(d, cut, d.size)
            last = d.extents.find(new - 1) if new else None
            if last is not None and last.vend > new:
                # clip the tail extent; its block-rounded footprint is unchanged
                d.extents.remove_range(last.vstart, last.vend)
                d.extents.insert(last.vstart, new - last.vstart, last.lun, last.offset,
                                 last.flags)
        old_end = d.size
        d.size = new
        if new > old_end:
            tail = d.extents.find(old_end - 1) if old_end else None
            if tail is not None and old_end % BLOCK_SIZE:
                # the old short tail extent grows to its full block (already allocated)
                d.extents.remove_range(tail.vstart, tail.vend)
                d.extents.insert(tail.vstart, min(round_up(tail.length), new - tail.vstart),
                                 tail.lun, tail.offset, tail.flags)
        self._map(d, pieces)

    def _disk_rm(self, rec: R.DiskRm) -> None:
        d = self.disk(rec.name)
        self._no_snapshots(d)
        self._unmap(d, 0, d.size)
        del self.disks[d.name]

    def _no_snapshots(self, d: Disk) -> None:
        snaps = sorted(n for n, t in self.snaps.items() if t.parent == d.name)
        if snaps:
            raise StateError(f"disk {d.name!r} has snapshots: {', '.join(snaps)}")

    def _disk_rename(self, rec: R.DiskRename) -> None:
        d = self.disk(rec.name)
        new = rec.new
        if new == d.name:
            raise StateError(f"cannot rename {d.name!r} to {new!r}")
        if new in self.disks:
            if not rec.replace:
                raise StateError(f"cannot rename {d.name!r} to {new!r}: it exists")
            target = self.disks[new]  # replaced atomically, as rename(2) does
            self._no_snapshots(target)
            self._unmap(target, 0, target.size)
            del self.disks[new]
        del self.disks[d.name]
        for j in self.jobs.values():
            if j.disk == d.name and j.state == "running":
                j.disk = new
            if j.state == "running":
                j.placed = [(new if n == d.name else n, h, p) for n, h, p in j.placed]
        old = d.name
        d.name = new
        d.epoch += 1
        self.disks[new] = d
        for full in [n for n, t in self.snaps.items() if t.parent == old]:
            snap = self.snaps.pop(full)  # NAME@SNAP follows its disk's name
            snap.parent, snap.name = new, snapshot_name(new, split_snapshot_name(full)[1])
            self.snaps[snap.name] = snap
            for t in (*self.disks.values(), *self.snaps.values()):
                if t.origin == full:
                    t.origin = snap.name

    def _disk_place(self, rec: R.DiskPlace) -> None:
        """Where a disk's new space goes: its home container and its pin (or None)."""
        d = self.disk(rec.name)
        home, pin = rec.home, rec.pin
        if home not in self.luns or (pin is not None and pin not in self.luns):
            raise StateError(f"disk.place: unknown LUN {home!r} or {pin!r}")
        d.home, d.pin = home, pin

    def _disk_qos(self, rec: R.DiskQos) -> None:
        """A disk's QoS limits (replacing the ones it had)."""
        self.disk(rec.name).qos = dict(rec.limits)

    # ------------------------------------------------------------ jobs
    def _job_start(self, rec: R.JobStart) -> None:
        jid, kind = rec.id, rec.kind
        if jid < self.next_job or kind not in JOB_KINDS:
            raise StateError(f"bad job.start {jid!r} {kind!r}")
        disk, src, dst = rec.disk, rec.src, rec.dst
        if disk is not None:
            self.disk(disk)
        for lun in (src, dst, *(x for _n, home, pin in rec.placed for x in (home, pin))):
            if lun is not None and lun not in self.luns:
                raise StateError(f"job.start: unknown LUN {lun!r}")
        self.jobs[jid] = Job(jid, kind, disk, src, dst, rec.started, placed=list(rec.placed),
                             rate=rec.rate)
        self.next_job = jid + 1

    def _job_abort(self, rec: R.JobAbort) -> None:
        """An abort was asked for: it survives a restart (the job then rolls back)."""
        j = self.jobs.get(rec.id)
        if j is None or j.state != "running":
            raise StateError(f"job.abort: no running job {rec.id!r}")
        j.aborting = True

    def _job_end(self, rec: R.JobEnd) -> None:
        j = self.jobs.get(rec.id)
        if j is None or j.state != "running" or rec.state not in JOB_STATES[1:]:
            raise StateError(f"bad job.end {rec.id!r} {rec.state!r}")
        j.state, j.ended, j.message = rec.state, rec.ended, rec.message
        if j.kind == "drain" and rec.state == "done" and j.src in self.luns:
            self.luns[j.src].drained = True  # stays out of placement (container restore)
        done = sorted(k for k, o in self.jobs.items() if o.state != "running")
        for k in done[: max(0, len(done) - KEEP_FINISHED_JOBS)]:
            del self.jobs[k]

    # ------------------------------------------------------------ snapshots, clones
    def _snap_create(self, rec: R.SnapCreate) -> None:
        """DISK@SNAP: a read-only copy of the disk's table, sharing all its storage."""
        d = self.disk(rec.name)
        full = snapshot_name(d.name, rec.snap)
        if full in self.snaps:
            raise StateError(f"snapshot {full!r} already exists")
        if d.alts:
            raise StateError(f"disk {d.name!r} has segments being moved")
        self.snaps[full] = Disk(full, d.size, d.segment_size, d.thick, d.pin, d.home,
                                rec.ctime, d.extents.clone(), family=d.family,
                                parent=d.name)
        perms.inherit(d, self.snaps[full])
        d.epoch += 1  # its storage is shared now: writes must copy first

    def _removable(self, name: str) -> Disk:
        """Snapshot name, which snap.trim and snap.rm may remove; StateError if there is
        none, or it has clones (they share its storage)."""
        s = self.snaps.get(name)
        if s is None:
            raise StateError(f"no such snapshot: {name!r}")
        users = sorted(t.name for t in (*self.disks.values(), *self.snaps.values())
                       if t.origin == s.name)
        if users:
            raise StateError(f"snapshot {s.name!r} has clones: {', '.join(users)}")
        return s

    def _snap_rm(self, rec: R.SnapRm) -> None:
        """Drop a snapshot; free what no other table of its family maps."""
        s = self._removable(rec.name)
        del self.snaps[s.name]
        # what another table holds as the same extent chunk frees nothing: O(chunks)
        self.release_unshared(s.family, sharing.own_pieces(s, self.family(s.family)))

    def _snap_trim(self, rec: R.SnapTrim) -> None:
        """A snapshot being removed: marked so for good, and its extents in [start, end)
        dropped, freeing what no other table of its family maps (R.SnapTrim)."""
        s = self._removable(rec.name)
        start, end = rec.start, rec.end
        if not (0 <= start <= end <= s.size):
            raise StateError(f"trim range {start}..{end} outside snapshot {s.name!r}")
        if end % BLOCK_SIZE and end != s.size:
            raise StateError(f"unaligned trim end {end} inside snapshot {s.name!r}")
        if end > start:
            self._unmap(s, start, end)  # checks the start, moving segments; frees
        s.removing = True

    def _disk_clone(self, rec: R.DiskClone) -> None:
        """A writable disk from a snapshot, sharing its storage."""
        s = self.snaps.get(rec.snap)
        new = rec.new
        if s is None:
            raise StateError(f"no such snapshot: {rec.snap!r}")
        if s.removing:
            raise StateError(f"snapshot {rec.snap!r} is being removed")
        if new in self.disks:
            raise StateError(f"cannot clone to {new!r}")
        self.disks[new] = Disk(new, s.size, s.segment_size, s.thick, s.pin, s.home,
                               rec.ctime, s.extents.clone(), family=s.family,
                               origin=s.name)
        perms.inherit(s, self.disks[new])

    def _snap_rollback(self, rec: R.SnapRollback) -> None:
        """The disk's content (and size) becomes its snapshot's; what only the disk held
        is freed."""
        s = self.snaps.get(rec.snap)
        if s is None or s.parent is None:
            raise StateError(f"no such snapshot: {rec.snap!r}")
        if s.removing:
            raise StateError(f"snapshot {rec.snap!r} is being removed")
        d = self.disk(s.parent)
        if d.alts:
            raise StateError(f"disk {d.name!r} has segments being moved")
        old = list(d.extents)
        d.extents = s.extents.clone()
        d.size = s.size
        d.epoch += 1
        self.release_unshared(d.family, old)

    def _controller_boot(self, rec: R.ControllerBoot) -> None:
        boot = rec.boot
        if boot != self.boot + 1:
            raise StateError(f"boot must be {self.boot + 1}, not {boot!r}")
        if rec.installation is not None:
            if self.installation not in (None, rec.installation):
                raise StateError(f"installation {self.installation} cannot become "
                                 f"{rec.installation}")
            self.installation = rec.installation
        self.boot = boot

    def _disk_unmap(self, rec: R.DiskUnmap) -> None:
        d = self.disk(rec.name)
        start, end = rec.start, rec.end
        if not (0 <= start <= end <= d.size):
            raise StateError(f"unmap range {start}..{end} outside disk")
        if end % BLOCK_SIZE and end != d.size:
            # freeing a partial block would free storage the rest of the block still uses
            raise StateError(f"unaligned unmap end {end} inside the disk")
        self._unmap(d, start, end)


# The handler of each record type: State._disk_create for DiskCreate (op "disk.create"),
# and so on; each takes its record type (tests/model/test_units_records.py checks).
# The move records' handlers are functions of state_moves.py (move_start for
# MoveStart, ...), and disk.perms's is perms.disk_perms; they take the State first.
_MOVES: dict[type[Record], Callable[..., None]] = {
    R.MoveStart: state_moves.move_start, R.MoveMark: state_moves.move_mark,
    R.MoveCommit: state_moves.move_commit, R.MoveAbort: state_moves.move_abort,
    R.StorageRelocate: state_relocate.storage_relocate,
    R.DiskPerms: perms.disk_perms}  # (a disk's owner, group and mode: perms.py)
_HANDLERS: dict[type[Record], Callable[..., None]] = {
    rec: _MOVES.get(rec) or getattr(State, "_" + rec.OP.replace(".", "_")) for rec in RECORDS}
