"""vdctl check: the table's invariants, verified from the tables alone (pure).

Errors are corruption (overlaps, extents past an end, storage in use but marked
free, storage shared outside a family or at another vstart, moves without their
segment, bad bitmap sizes, jobs naming missing things); leaks are space
neither used nor free, reported without failing.
"""

from __future__ import annotations

from dataclasses import dataclass

from .extents import MOVING
from .protocol import BLOCK_SIZE
from .state import State
from .tables import round_up
from .units import human


@dataclass
class Problem:
    level: str  # "error" (corruption) or "leak"
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"level": self.level, "message": self.message}


def check(state: State) -> list[Problem]:
    """Verify the table's invariants; errors are corruption, leaks are lost space."""
    probs: list[Problem] = []

    def err(msg: str) -> None:
        probs.append(Problem("error", msg))

    paths: dict[str, str] = {}
    for cont in state.containers.values():
        if cont.path in paths:
            err(f"containers {paths[cont.path]!r} and {cont.name!r} are the same file "
                f"{cont.path}")
        paths[cont.path] = cont.name

    # (offset, length, what, sharing key): a disk's, snapshot's or clone's extent may
    # share storage with another table of its family at the same vstart (the key is
    # (family, vstart - offset)); an alternate location never shares (key None)
    used: dict[int, list[tuple[int, int, str, tuple[int, int] | None]]] = {
        lun: [] for lun in state.luns}
    for d in (*state.disks.values(), *state.snaps.values()):
        if d.parent is not None and d.parent not in state.disks:
            err(f"snapshot {d.name!r} belongs to missing disk {d.parent!r}")
        if d.origin is not None and d.origin not in state.snaps:
            err(f"clone {d.name!r} comes from missing snapshot {d.origin!r}")
        prev_end = 0
        count = 0
        mapped = 0
        for e in d.extents:
            where = f"disk {d.name!r} extent {e.vstart}+{e.length}"
            count += 1
            mapped += e.length
            if e.vstart < prev_end:
                err(f"{where} overlaps the previous extent")
            prev_end = e.vend
            if e.vend > d.size:
                err(f"{where} runs past the disk's end ({d.size})")
            if (e.vstart % BLOCK_SIZE or e.offset % BLOCK_SIZE
                    or (e.length % BLOCK_SIZE and e.vend != d.size)):
                err(f"{where} is not block-aligned")
            c = state.luns.get(e.lun)
            if c is None:
                err(f"{where} points at unknown LUN {e.lun}")
                continue
            if e.offset + round_up(e.length) > c.end:
                err(f"{where} runs past the end of container {c.name!r}")
            elif e.offset < c.reserved:
                err(f"{where} overlaps the label of container {c.name!r}")
            used[e.lun].append((e.offset, round_up(e.length), where,
                                (d.family, e.vstart - e.offset)))
        if count != len(d.extents) or mapped != d.extents.mapped_bytes:
            err(f"disk {d.name!r} extent counters are wrong")
        for e in d.extents:
            if e.flags & MOVING and e.vstart not in d.alts:
                err(f"disk {d.name!r} segment at {e.vstart} is moving but has no alternate "
                    "location")
        for vs, a in d.alts.items():
            e2 = d.extents.find(vs)
            where = f"disk {d.name!r} alternate location of the segment at {vs}"
            if e2 is None or e2.vstart != vs or not e2.flags & MOVING:
                err(f"{where} has no moving segment")
            elif a.bitmap.nblocks != -(-e2.length // BLOCK_SIZE):
                err(f"disk {d.name!r} bitmap at {vs} has {a.bitmap.nblocks} blocks, "
                    f"segment needs {-(-e2.length // BLOCK_SIZE)}")
            c = state.luns.get(a.lun)
            if c is None:
                err(f"{where} points at unknown LUN {a.lun}")
                continue
            n = a.bitmap.nblocks * BLOCK_SIZE
            if a.offset % BLOCK_SIZE or a.offset < c.reserved or a.offset + n > c.end:
                err(f"{where} is misaligned or runs past the end of container {c.name!r}")
            used[a.lun].append((a.offset, n, where, None))
    for j in state.jobs.values():
        if j.state == "running":
            if j.disk is not None and j.disk not in state.disks:
                err(f"job {j.id} ({j.kind}) runs on missing disk {j.disk!r}")
            for lun in (j.src, j.dst):
                if lun is not None and lun not in state.luns:
                    err(f"job {j.id} ({j.kind}) names unknown LUN {lun}")

    for lun, ranges in used.items():
        c = state.luns[lun]
        ranges.sort(key=lambda r: (r[0], r[1]))
        # reference counts: a block is used by one table, or shared only within a family
        # at the same vstart (snapshots, clones); union of the ranges for the usage
        reach, reach_key, reach_what = -1, None, ""
        total_used = 0
        for off, n, where, key in ranges:
            if off < reach and (key is None or key != reach_key):
                err(f"container {c.name!r}: {reach_what} and {where} share storage at {off}")
            total_used += max(0, off + n - max(off, reach))
            if off + n > reach:
                reach, reach_key, reach_what = off + n, key, where
        free = list(c.space.ranges())
        fi = 0
        for off, n, where, _key in ranges:
            while fi < len(free) and free[fi][0] + free[fi][1] <= off:
                fi += 1
            if fi < len(free) and free[fi][0] < off + n:
                err(f"container {c.name!r}: {where} is in use but marked free")
        if total_used + c.space.free < c.usable:
            probs.append(Problem(
                "leak",
                f"container {c.name!r}: {human(c.usable - total_used - c.space.free)} is "
                "neither free nor used by any disk",
            ))
        elif total_used + c.space.free > c.usable and not any(p.level == "error" for p in probs):
            err(f"container {c.name!r}: used + free exceeds its size")
    return probs
