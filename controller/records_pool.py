"""Journal records of the pool and the controller: containers (with their labels,
docs/labels.md) and controller starts. records.py lists them with the others (RECORDS)
and decodes them; see there for what a record checks and what apply checks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Self

from .recordbase import Named, Record, Wire, bad_field, get_bool, get_id, get_int, get_str, record

# ---------------------------------------------------------------- containers


@record
class ContainerAdd(Record):
    """A container file joins: LUN lun, size bytes; created: virtfs made the file; uuid:
    its label's container id (None in records written before labels: unlabelled)."""

    OP: ClassVar[str] = "container.add"
    name: str
    lun: int
    path: str
    size: int
    created: bool
    uuid: str | None = None
    shared: bool = False

    def to_wire(self) -> Wire:
        w: Wire = {"op": self.OP, "name": self.name, "lun": self.lun, "path": self.path,
                   "size": self.size, "created": self.created}
        if self.uuid is not None:
            w["uuid"] = self.uuid
        if self.shared:
            w["shared"] = True
        return w

    @classmethod
    def from_wire(cls, d: Mapping[str, object]) -> Self:
        return cls(get_str(d, "name"), get_int(d, "lun", 0), get_str(d, "path"),
                   get_int(d, "size", 0), get_bool(d, "created"), get_id(d, "uuid"),
                   get_bool(d, "shared") if "shared" in d else False)


@record
class ContainerShare(Record):
    """A container becomes shared between hosts (agents do its I/O with O_DIRECT: no
    dirty pages outlive a lease; docs/fencing.md), or stops being shared."""

    OP: ClassVar[str] = "container.share"
    name: str
    shared: bool

    def to_wire(self) -> Wire:
        return {"op": self.OP, "name": self.name, "shared": self.shared}

    @classmethod
    def from_wire(cls, d: Mapping[str, object]) -> Self:
        return cls(get_str(d, "name"), get_bool(d, "shared"))


@record
class ContainerLabel(Record):
    """A container added before labels gets one: its first block (free now) becomes the
    label's, and uuid its container id (docs/labels.md)."""

    OP: ClassVar[str] = "container.label"
    name: str
    uuid: str

    def to_wire(self) -> Wire:
        return {"op": self.OP, "name": self.name, "uuid": self.uuid}

    @classmethod
    def from_wire(cls, d: Mapping[str, object]) -> Self:
        uuid = get_id(d, "uuid")
        if uuid is None:
            raise bad_field(d, "uuid", None, "32 hex digits")
        return cls(get_str(d, "name"), uuid)


@record
class ContainerFail(Named):
    """Every entry on the container becomes `error` at the agents."""

    OP: ClassVar[str] = "container.fail"


@record
class ContainerRestore(Named):
    """A failed container serves again."""

    OP: ClassVar[str] = "container.restore"


@record
class ContainerRm(Named):
    """An empty container leaves."""

    OP: ClassVar[str] = "container.rm"


# ---------------------------------------------------------------- the controller


@record
class ControllerBoot(Record):
    """A controller start, number boot (one more than the last). installation: the
    installation id the first start with labels chose (docs/labels.md); None after."""

    OP: ClassVar[str] = "controller.boot"
    boot: int
    installation: str | None = None

    def to_wire(self) -> Wire:
        w: Wire = {"op": self.OP, "boot": self.boot}
        if self.installation is not None:
            w["installation"] = self.installation
        return w

    @classmethod
    def from_wire(cls, d: Mapping[str, object]) -> Self:
        return cls(get_int(d, "boot"), get_id(d, "installation"))
