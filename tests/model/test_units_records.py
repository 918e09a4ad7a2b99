"""controller/records.py: every journal op's record, its wire form and its checks.

The wire form must stay what the service wrote while records were dicts (same keys,
same order, same shapes): journals on disk stay byte for byte the same, and a
controller from before still reads a new one.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from stateimage import image

from controller import frames
from controller.records import RECORDS, DiskRename, JobEnd, Record, decode
from controller.state import _HANDLERS, State
from controller.tables import StateError

# one record of each op, as the service built it before records were typed
WIRE: list[dict[str, Any]] = [
    {"op": "container.add", "name": "c1", "lun": 1, "path": "/x/c1", "size": 1 << 30,
     "created": True},
    {"op": "container.add", "name": "c2", "lun": 2, "path": "/x/c2", "size": 1 << 30,
     "created": False, "uuid": "0123456789abcdef0123456789abcdef"},
    {"op": "container.label", "name": "c1", "uuid": "fedcba9876543210fedcba9876543210"},
    {"op": "container.add", "name": "c3", "lun": 3, "path": "/x/c3", "size": 1 << 30,
     "created": False, "uuid": "0123456789abcdef0123456789abcdee", "shared": True},
    {"op": "container.share", "name": "c1", "shared": True},
    {"op": "container.fail", "name": "c1"},
    {"op": "container.restore", "name": "c1"},
    {"op": "container.rm", "name": "c1"},
    {"op": "disk.create", "name": "d", "size": 12345, "segment_size": 4 << 20,
     "thick": True, "pin": None, "home": 1, "ctime": 1700000000.123,
     "map": [[0, 12345, 1, 0]]},
    {"op": "disk.map", "name": "d", "map": [[0, 4096, 1, 8192], [8192, 4096, 2, 0]]},
    {"op": "disk.times", "name": "d", "mtime": 1234.5, "stime": 2345.25},
    {"op": "disk.resize", "name": "d", "size": 1 << 20, "map": []},
    {"op": "disk.rm", "name": "d"},
    {"op": "disk.rename", "name": "d", "new": "e"},
    {"op": "disk.rename", "name": "d", "new": "e", "replace": True},
    {"op": "disk.place", "name": "d", "home": 2, "pin": None},
    {"op": "disk.place", "name": "d", "home": 2, "pin": 2},
    {"op": "disk.unmap", "name": "d", "start": 0, "end": 8192},
    {"op": "disk.qos", "name": "d", "limits": {"iops": 300, "write_bps": 4 << 20}},
    {"op": "disk.perms", "name": "d", "uid": 0, "gid": 6, "mode": 0o640},
    {"op": "disk.perms", "name": "d", "uid": None, "gid": None, "mode": None},
    {"op": "disk.clone", "snap": "d@s", "new": "f", "ctime": 1.5},
    {"op": "move.start", "name": "d", "vstart": 0, "length": 4096, "lun": 2, "offset": 0},
    {"op": "move.mark", "name": "d", "vstart": 0, "runs": [[0, 1], [3, 2]]},
    {"op": "move.commit", "name": "d", "vstart": 0},
    {"op": "move.abort", "name": "d", "vstart": 0},
    {"op": "job.start", "id": 3, "kind": "drain", "disk": None, "src": 1, "dst": None,
     "started": 5.25},
    {"op": "job.start", "id": 4, "kind": "migrate", "disk": "d", "src": None, "dst": 2,
     "started": 6.0},
    {"op": "job.start", "id": 5, "kind": "migrate", "disk": "d", "src": None, "dst": 2,
     "started": 6.5, "placed": [["d", 1, 1]]},
    {"op": "job.abort", "id": 4},
    {"op": "job.end", "id": 3, "state": "done", "message": "", "ended": 7.125},
    {"op": "snap.create", "name": "d", "snap": "s", "ctime": 8.0},
    {"op": "snap.rm", "name": "d@s"},
    {"op": "snap.trim", "name": "d@s", "start": 0, "end": 4096},
    {"op": "snap.rollback", "snap": "d@s"},
    {"op": "controller.boot", "boot": 2},
    {"op": "controller.boot", "boot": 1, "installation": "00112233445566778899aabbccddeeff"},
    {"op": "storage.relocate", "family": 1, "vstart": 8192, "length": 4096, "lun": 1,
     "offset": 0, "new_lun": 2, "new_offset": 40960},
]


def test_every_op_has_an_example_and_a_handler_of_its_type():
    assert {w["op"] for w in WIRE} == {c.OP for c in RECORDS}
    assert len({c.OP for c in RECORDS}) == len(RECORDS)
    assert set(_HANDLERS) == set(RECORDS)
    for cls, handler in _HANDLERS.items():
        ann = inspect.signature(handler).parameters["rec"].annotation
        assert ann == f"R.{cls.__name__}", (cls, handler)


@pytest.mark.parametrize("wire", WIRE, ids=lambda w: w["op"])
def test_wire_form_is_unchanged_byte_for_byte(wire):
    rec = decode(wire)
    assert wire["op"] == type(rec).OP
    w = rec.to_wire()
    assert list(w.items()) == list(wire.items())  # the same keys in the same order
    assert frames.encode({**w, "seq": 9}) == frames.encode({**wire, "seq": 9})
    assert decode({**w, "seq": 9}) == rec  # the seq is the journal's, not the record's


def test_optional_fields_take_their_old_defaults():
    """Fields the handlers read with a default (before records were typed) keep it."""
    assert decode({"op": "disk.rename", "name": "a", "new": "b"}) == DiskRename("a", "b")
    assert decode({"op": "job.end", "id": 1, "state": "failed", "ended": 2.0}) == JobEnd(
        1, "failed", "", 2.0)
    d = decode({"op": "disk.create", "name": "d", "size": 0, "segment_size": 4096,
                "thick": False, "pin": None, "home": 1})
    assert d.to_wire()["ctime"] == 0.0 and d.to_wire()["map"] == []


@pytest.mark.parametrize("bad", [
    None, [], "disk.rm", {}, {"op": 5}, {"op": ["disk.rm"]}, {"op": "disk.format"},
    {"op": "disk.rm"}, {"op": "disk.rm", "name": 5},
    {"op": "container.add", "name": "c", "lun": 1, "path": "/x", "size": 1, "created": 1},
    {"op": "container.add", "name": "c", "lun": -1, "path": "/x", "size": 1,
     "created": True},
    {"op": "disk.create", "name": "d", "size": -1, "segment_size": 4096, "thick": False,
     "pin": None, "home": 1},
    {"op": "disk.create", "name": "d", "size": 1, "segment_size": 4096, "thick": False,
     "pin": "c1", "home": 1},
    {"op": "disk.map", "name": "d", "map": [[0, 4096, 1]]},
    {"op": "disk.map", "name": "d", "map": [[0, 4096.0, 1, 0]]},
    {"op": "disk.times", "name": "d", "mtime": -1, "stime": 0},
    {"op": "disk.times", "name": "d", "mtime": True, "stime": 0},
    {"op": "disk.resize", "name": "d", "size": "1"},
    {"op": "disk.rename", "name": "d", "new": "e", "replace": 1},
    {"op": "disk.unmap", "name": "d", "start": 0, "end": None},
    {"op": "disk.perms", "name": "d", "uid": -1, "gid": 6, "mode": 0o640},
    {"op": "disk.perms", "name": "d", "uid": 0, "gid": 6, "mode": 0o10000},
    {"op": "disk.perms", "name": "d", "uid": 0, "gid": "wheel", "mode": 0o640},
    {"op": "disk.perms", "name": "d", "uid": True, "gid": 0, "mode": 0o640},
    {"op": "disk.perms", "name": "d", "uid": 0, "gid": 0},
    {"op": "disk.clone", "snap": "d@s", "new": "f@g", "ctime": 1.0},
    {"op": "move.mark", "name": "d", "vstart": 0, "runs": [[0, 0]]},
    {"op": "move.mark", "name": "d", "vstart": 0, "runs": [[-1, 1]]},
    {"op": "move.mark", "name": "d", "vstart": 0, "runs": "0,1"},
    {"op": "move.commit", "name": "d", "vstart": "0"},
    {"op": "job.start", "id": 1, "kind": "copy", "disk": None, "src": 1, "dst": None,
     "started": 1.0},
    {"op": "job.end", "id": 1, "state": "running", "ended": 1.0},
    {"op": "snap.create", "name": "d", "snap": "a/b", "ctime": 1.0},
    {"op": "snap.create", "name": "d", "snap": "", "ctime": 1.0},
    {"op": "controller.boot", "boot": 1.0},
    {"op": "controller.boot", "boot": 1, "installation": "ABC"},
    {"op": "container.label", "name": "c"},
    {"op": "container.share", "name": "c", "shared": 1},
    {"op": "disk.qos", "name": "d", "limits": {"iops": 0}},
    {"op": "disk.qos", "name": "d", "limits": {"latency": 5}},
    {"op": "disk.qos", "name": "d", "limits": [["iops", 5]]},
    {"op": "container.label", "name": "c", "uuid": "0123456789abcdef0123456789ABCDEF"},
    {"op": "container.add", "name": "c", "lun": 1, "path": "/x", "size": 1 << 20,
     "created": True, "uuid": 5},
])
def test_bad_records_are_refused_and_change_nothing(bad):
    s = State()
    before = image(s)
    with pytest.raises(StateError):
        decode(bad)
    with pytest.raises(StateError):
        s.apply_wire(bad)
    assert image(s) == before


def test_records_are_slotted_and_immutable_to_mypy_only():
    """Frozen for the type checker (a plain dataclass at run time: cheaper to build)."""
    rec = decode(WIRE[0])
    assert isinstance(rec, Record) and not hasattr(rec, "__dict__")
    assert "frozen_default" in inspect.getsource(inspect.getmodule(Record))
