"""Journal records of shared storage (docs/movement.md, "Relocating shared storage"):
storage a snapshot or clone maps is immutable, so it moves whole, in one record.
records.py lists them with the others (RECORDS) and decodes them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Self

from .recordbase import Record, Wire, get_int, record


@record
class StorageRelocate(Record):
    """Storage (lun, offset, length bytes) that tables of family `family` map at vstart
    (a table maps byte v of [vstart, vstart + length) to lun, offset + v - vstart) moves
    to (new_lun, new_offset): every table of the family that maps any of it there is
    switched, the new range is taken and the old one freed (the controller copied the
    bytes durably before, and punches the old range once agents acknowledged the switch;
    controller/state_relocate.py checks the rest). Offsets, vstart and length are whole
    blocks (4 KiB)."""

    OP: ClassVar[str] = "storage.relocate"
    family: int
    vstart: int
    length: int
    lun: int
    offset: int
    new_lun: int
    new_offset: int

    def to_wire(self) -> Wire:
        return {"op": self.OP, "family": self.family, "vstart": self.vstart,
                "length": self.length, "lun": self.lun, "offset": self.offset,
                "new_lun": self.new_lun, "new_offset": self.new_offset}

    @classmethod
    def from_wire(cls, d: Mapping[str, object]) -> Self:
        return cls(get_int(d, "family", 0), get_int(d, "vstart", 0), get_int(d, "length", 1),
                   get_int(d, "lun", 0), get_int(d, "offset", 0), get_int(d, "new_lun", 0),
                   get_int(d, "new_offset", 0))
