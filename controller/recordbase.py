"""The base of journal records (records.py): the Record class, the dataclass decorator
that makes one, and the field checks their from_wire methods share.

The classes are frozen for mypy only (``record`` below is a
``typing.dataclass_transform`` with ``frozen_default``): at run time they are
plain slotted dataclasses, because a really frozen one costs about three times as
much to build (``object.__setattr__`` per field), once per replayed record.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Self, TypeVar, dataclass_transform

from .tables import Piece, StateError

Wire = dict[str, object]  # a record's map, as msgpack carries it

_R = TypeVar("_R", bound="Record")


@dataclass_transform(frozen_default=True)
def record(cls: type[_R]) -> type[_R]:
    """Make cls a record class: a slotted dataclass, frozen to the type checker."""
    return dataclass(slots=True)(cls)


class Record:
    """A journal record. Subclasses set OP and implement to_wire and from_wire."""

    __slots__ = ()
    OP: ClassVar[str]

    def to_wire(self) -> Wire:
        """The record as the journal stores it (without its seq)."""
        raise NotImplementedError

    @classmethod
    def from_wire(cls, d: Mapping[str, object]) -> Self:
        """The record from its wire map; StateError names a missing or bad field."""
        raise NotImplementedError


# ---------------------------------------------------------------- field checks


def get(d: Mapping[str, object], key: str) -> object:
    """d[key]; StateError if the record has no such field."""
    try:
        return d[key]
    except KeyError:
        raise StateError(f"malformed {d.get('op')} record: no {key!r}") from None


def bad_field(d: Mapping[str, object], key: str, v: object, want: str) -> StateError:
    """The error for field key of record d holding v (or missing) where want was due."""
    if key not in d:
        return StateError(f"malformed {d.get('op')} record: no {key!r}")
    return StateError(f"bad {d.get('op')} field {key}: {v!r} is not {want}")


# (each checks the usual case first, in one call: they run for every replayed record)


def get_int(d: Mapping[str, object], key: str, lo: int | None = None) -> int:
    """An exact int (a bool is not a byte count), at least lo if given."""
    v = d.get(key)
    if type(v) is int and (lo is None or v >= lo):
        return v
    raise bad_field(d, key, v, "an integer" if lo is None else f"an integer >= {lo}")


def get_opt_int(d: Mapping[str, object], key: str) -> int | None:
    """get_int, or None."""
    v = d.get(key)
    if v is None and key in d:
        return None
    return get_int(d, key)


def get_str(d: Mapping[str, object], key: str) -> str:
    """A string."""
    v = d.get(key)
    if type(v) is str:
        return v
    raise bad_field(d, key, v, "a string")


def get_opt_str(d: Mapping[str, object], key: str) -> str | None:
    """get_str, or None."""
    v = d.get(key)
    if v is None and key in d:
        return None
    return get_str(d, key)


def get_id(d: Mapping[str, object], key: str) -> str | None:
    """An id of 32 lower-case hex digits (a label's installation or container id), or
    None if the key is absent (records written before labels)."""
    v = d.get(key)
    if v is None:
        return None
    if type(v) is str and len(v) == 32 and all(c in "0123456789abcdef" for c in v):
        return v
    raise bad_field(d, key, v, "32 hex digits")


def get_bool(d: Mapping[str, object], key: str) -> bool:
    """True or False (not 0 or 1)."""
    v = d.get(key)
    if type(v) is bool:
        return v
    raise bad_field(d, key, v, "true or false")


def get_time(d: Mapping[str, object], key: str, default: float | None = None) -> float:
    """A time in seconds since the epoch (an int or a float, kept as it is)."""
    v = d.get(key, default) if default is not None else get(d, key)
    if type(v) is not float and type(v) is not int:
        raise bad_field(d, key, v, "a time")
    return v


def get_pieces(d: Mapping[str, object]) -> list[Piece]:
    """The "map" field (absent: none): [[vstart, length, lun, offset], ...]."""
    raw = d.get("map")
    if type(raw) is not list:
        if raw is None and "map" not in d:
            return []
        raise StateError("map must be a list")
    out: list[Piece] = []
    for p in raw:
        # exact type checks (a bool is not a byte count); this runs once per replayed piece
        if type(p) is not list or len(p) != 4:
            raise StateError(f"bad map piece {p!r}")
        a, b, c, e = p
        if type(a) is not int or type(b) is not int or type(c) is not int or type(e) is not int:
            raise StateError(f"bad map piece {p!r}")
        out.append((a, b, c, e))
    return out


def wire_pieces(pieces: list[Piece]) -> list[list[int]]:
    """Pieces in their wire form, lists (as the journal has always held them)."""
    return [list(p) for p in pieces]


# ---------------------------------------------------------------- shapes several ops share


@record
class Named(Record):
    """A record of one field, the name of a container, disk or snapshot (a base, not an op)."""

    name: str

    def to_wire(self) -> Wire:
        return {"op": self.OP, "name": self.name}

    @classmethod
    def from_wire(cls, d: Mapping[str, object]) -> Self:
        name = d.get("name")
        if type(name) is not str:
            raise bad_field(d, "name", name, "a string")
        return cls(name)


@record
class Segment(Record):
    """A record naming the segment moving at vstart of disk name (a base, not an op)."""

    name: str
    vstart: int

    def to_wire(self) -> Wire:
        return {"op": self.OP, "name": self.name, "vstart": self.vstart}

    @classmethod
    def from_wire(cls, d: Mapping[str, object]) -> Self:
        name, vstart = d.get("name"), d.get("vstart")
        if type(name) is str and type(vstart) is int:
            return cls(name, vstart)
        return cls(get_str(d, "name"), get_int(d, "vstart"))  # raises


def pieces_of(rows: Iterable[Sequence[int]]) -> list[Piece]:
    """Planned pieces [vstart, length, lun, offset] (bytes; lists, as placement plans
    them) as a record's pieces. Raises StateError on a row that is not four ints."""
    out: list[Piece] = []
    for p in rows:
        if len(p) != 4:
            raise StateError(f"bad map piece {p!r}")
        out.append((p[0], p[1], p[2], p[3]))
    return out
