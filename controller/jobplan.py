"""What a drain or a migration moves (pure): the one plan the dry run prints and the job
runs, so they cannot disagree (docs/movement.md, "What a drain and a migration move").

Two kinds of data move:

- **live data**: a disk's (or clone's) own storage, which no other table maps. It is
  written in place, so it moves with the fine-grained method (controller/moves.py).
- **shared storage**: storage a snapshot maps, or that two tables of a family map
  (a disk and its snapshot, a clone and its snapshot). It is immutable (a write to it
  copies first), so it moves whole: one ``storage.relocate`` record per unit switches
  every table that maps it (controller/state_relocate.py). Units are cut at
  RELOCATE_CHUNK bytes, counted once however many tables map them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .extents import MOVING, Extent
from .protocol import BLOCK_SIZE
from .state import State
from .tables import Disk

RELOCATE_CHUNK = 8 << 20  # bytes: the largest unit one storage.relocate moves


@dataclass(frozen=True)
class Unit:
    """Shared storage to relocate: lun, offset, length bytes (whole blocks), mapped by
    tables of family `family` at vstart; `owner`: the disk it is counted under (a
    snapshot's disk, or the disk or clone itself)."""

    family: int
    vstart: int
    length: int
    lun: int
    offset: int
    owner: str


@dataclass
class JobPlan:
    """What a job moves now. live: bytes of disks' own data (per disk), shared: bytes of
    snapshot and clone storage (per disk, counted once), units: the shared storage,
    dest: the destination LUN (None: wherever placement puts it)."""

    kind: str
    src: int | None
    dest: int | None
    live: dict[str, int] = field(default_factory=dict)
    shared: dict[str, int] = field(default_factory=dict)
    units: list[Unit] = field(default_factory=list)

    @property
    def live_bytes(self) -> int:
        return sum(self.live.values())

    @property
    def shared_bytes(self) -> int:
        return sum(self.shared.values())

    @property
    def total(self) -> int:
        """Bytes still to move (live and shared)."""
        return self.live_bytes + self.shared_bytes

    def to_dict(self, state: State) -> dict[str, object]:
        """The plan as vdctl prints it (and --format json): per disk its live and shared
        bytes, the totals, the source and destination container names (dest None:
        wherever placement puts new space)."""
        names = {c.lun: c.name for c in state.containers.values()}
        disks = sorted(set(self.live) | set(self.shared))
        return {
            "kind": self.kind, "from": names.get(self.src) if self.src is not None else None,
            "to": names.get(self.dest) if self.dest is not None else None,
            "disks": [{"disk": n, "live": self.live.get(n, 0), "shared": self.shared.get(n, 0)}
                      for n in disks],
            "live": self.live_bytes, "shared": self.shared_bytes, "total": self.total,
            "units": len(self.units)}


def owner(t: Disk) -> str:
    """The disk a table's storage is counted under: a snapshot's disk, else itself."""
    return t.parent if t.is_snapshot and t.parent is not None else t.name


def split_shared(state: State, d: Disk, e: Extent) -> tuple[list[tuple[int, int]],
                                                             list[tuple[int, int]]]:
    """(shared, own) vstart ranges [lo, hi) of stored extent e of table d: the parts
    another table of d's family maps at the same place, and the rest."""
    shared = state.referenced(d.family, e.vstart, e.vend, e.lun, e.offset, skip=d)
    own, pos = [], e.vstart
    for lo, hi in shared:
        if lo > pos:
            own.append((pos, lo))
        pos = max(pos, hi)
    if pos < e.vend:
        own.append((pos, e.vend))
    return shared, own


def _plan(state: State, kind: str, src: int | None, dest: int | None, disks: list[Disk],
          moves: Callable[[Extent], bool]) -> JobPlan:
    """The plan over disks (and their snapshots) for extents with moves(e) true."""
    plan = JobPlan(kind, src, dest)
    # shared storage by (family, lun, offset - vstart): vstart ranges, merged below
    # (a merged range is counted under its first table's owner: a snapshot's before a
    # disk's or clone's that share it, so a snapshot's storage counts under its disk)
    spans: dict[tuple[int, int, int], list[tuple[int, int, int, str]]] = {}

    def add(t: Disk, e: Extent, lo: int, hi: int) -> None:
        spans.setdefault((t.family, e.lun, e.offset - e.vstart), []).append(
            (lo, hi, 0 if t.is_snapshot else 1, owner(t)))

    names = {d.name for d in disks}
    for d in disks:
        for e in d.extents:
            # a move under way onto the drained container counts too (it must end)
            onto_src = e.flags & MOVING and src is not None and d.alts[e.vstart].lun == src
            if not moves(e) and not onto_src:
                continue
            if e.flags & MOVING:  # a move under way is finished where it is
                plan.live[d.name] = plan.live.get(d.name, 0) + e.length
                continue
            shared, own = split_shared(state, d, e)
            n = sum(hi - lo for lo, hi in own)
            if n:
                plan.live[d.name] = plan.live.get(d.name, 0) + n
            for lo, hi in shared:
                add(d, e, lo, hi)
    for s in state.snaps.values():
        if s.parent in names or kind == "drain":
            for e in s.extents:
                if moves(e):
                    add(s, e, e.vstart, e.vend)
    for (fam, lun, delta), rs in sorted(spans.items()):
        rs.sort(key=lambda r: (r[0], r[2]))
        merged: list[tuple[int, int, str]] = []
        for lo, hi, _pri, who in rs:
            lo = lo // BLOCK_SIZE * BLOCK_SIZE
            hi = -(-hi // BLOCK_SIZE) * BLOCK_SIZE
            if merged and lo <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi), merged[-1][2])
            else:
                merged.append((lo, hi, who))
        for lo, hi, who in merged:
            pos = lo
            while pos < hi:
                n = min(RELOCATE_CHUNK, hi - pos)
                plan.units.append(Unit(fam, pos, n, lun, pos + delta, who))
                plan.shared[who] = plan.shared.get(who, 0) + n
                pos += n
    return plan


def plan_drain(state: State, lun: int, dest: int | None = None) -> JobPlan:
    """Everything a table maps on LUN lun: every disk's and clone's data there, and the
    storage of every snapshot there (dest: the drain's --to LUN, or None)."""
    return _plan(state, "drain", lun, dest, list(state.disks.values()),
                 lambda e: e.lun == lun)


def plan_migrate(state: State, name: str, dest: int) -> JobPlan:
    """Disk name's data not on LUN dest, and the storage its snapshots map outside dest
    (clones that share it are switched with it; their own data stays: migrate them)."""
    d = state.disks.get(name)
    return _plan(state, "migrate", None, dest, [d] if d is not None else [],
                 lambda e: e.lun != dest)
