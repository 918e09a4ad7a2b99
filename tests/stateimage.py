"""The tests' own view of a controller State, apart from the checkpoint code it checks.

``image(state)`` renders everything a State holds that replay and checkpoints must
reproduce as plain, comparable data: the counters, the jobs, the containers (with
their free lists), the disk and snapshot tables (every dataclass field that takes
part in comparison, the extents as packed columns, the alternates with their
bitmaps), each table in its order. Tests compare live against replayed, before
against after a refused record, written against loaded. It reads the tables
through their dataclass fields, so a field added later is compared without a change
here, and a value of a type it does not know fails loudly.

``format1(state)`` is the one-map checkpoint (format 1) as virtfs wrote it before
format 2: the product only reads it now, and its reader's tests need input.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from controller.allocator import FreeSpace
from controller.bitmap import Bitmap
from controller.extents import ExtentMap
from controller.state import State

# the State attributes that are its content (the rest, if any, is derived or volatile)
STATE_FIELDS = ("seq", "next_lun", "boot", "installation", "next_job", "next_family", "jobs",
                "containers", "disks", "snaps")


def _plain(v: Any) -> Any:
    if v is None or isinstance(v, bool | int | float | str | bytes):
        return v
    if isinstance(v, FreeSpace):
        return {"size": v.size, "free": v.free, "cursor": v.cursor, "ranges": v.to_wire()}
    if isinstance(v, ExtentMap):
        return v.to_wire()
    if isinstance(v, Bitmap):
        return (v.nblocks, v.to_bytes())
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v) if f.compare}
    if isinstance(v, dict):
        return [(k, _plain(x)) for k, x in v.items()]  # in order: the order is state too
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    raise TypeError(f"stateimage: no rendering for {type(v).__name__}: {v!r}")


def image(s: State) -> dict[str, Any]:
    """Everything s holds, as plain data (dicts, lists, tuples, scalars, bytes); two
    states hold the same tables exactly when their images are equal."""
    out = {k: _plain(getattr(s, k)) for k in STATE_FIELDS}
    out["luns"] = sorted((lun, c.name) for lun, c in s.luns.items())
    return out


def format1(s: State) -> dict[str, Any]:
    """s as a format-1 checkpoint map (the removed ``State.to_wire()``, field for field)."""
    return {
        "format": 1,
        "seq": s.seq,
        "next_lun": s.next_lun,
        "boot": s.boot,
        "next_job": s.next_job,
        "jobs": [j.to_wire() for j in s.jobs.values()],
        "containers": [
            {
                "name": c.name,
                "lun": c.lun,
                "path": c.path,
                "size": c.size,
                "created": c.created,
                "failed": c.failed,
                "draining": c.draining,
                # newer than format 1 (never in one written by older code); here when set,
                # so a state with it round-trips
                **({"drained": True} if c.drained else {}),
                "free": c.space.to_wire(),
                "cursor": c.space.cursor,
            }
            for c in s.containers.values()
        ],
        "disks": [
            {
                "name": d.name,
                "size": d.size,
                "segment_size": d.segment_size,
                "thick": d.thick,
                "pin": d.pin,
                "home": d.home,
                "ctime": d.ctime,
                "epoch": d.epoch,
                "extents": d.extents.to_wire(),
                "alts": [
                    [vs, a.lun, a.offset, a.bitmap.nblocks, a.bitmap.to_bytes()]
                    for vs, a in d.alts.items()
                ],
                "family": d.family, "origin": d.origin, "parent": d.parent,
                **({"mtime": d.mtime, "stime": d.stime} if d.mtime or d.stime else {}),
            }
            for d in (*s.disks.values(), *s.snaps.values())
        ],
        "next_family": s.next_family,
    }
