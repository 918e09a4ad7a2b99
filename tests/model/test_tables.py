"""virtfs.tables: every reply and push read into one TableUpdate, installed by one
apply_update (the version rules of DiskTable.load/replace, an answer without rows)."""

from __future__ import annotations

from typing import cast

import pytest

from controller.protocol import INVALID, NO_LUN, ZERO, encode_rows
from virtfs.agent import Session
from virtfs.blockio import ContainerIO
from virtfs.kernel import KernelCache
from virtfs.mapcache import DiskTable, TableError
from virtfs.tables import Tables, TableUpdate

SEG = 1 << 20


class FakeIO:
    def __init__(self) -> None:
        self.paths: dict[int, str] = {}
        self.labels: dict[int, tuple[str, str]] = {}
        self.shared: set[int] = set()
        self.calls = 0

    def set_shared(self, shared: set[int]) -> None:
        self.shared = set(shared)

    def set_paths(self, paths: dict[int, str],
                  labels: dict[int, tuple[str, str]] | None = None) -> None:
        self.calls += 1
        self.paths.update(paths)
        if labels is not None:
            self.labels = labels


def tables() -> tuple[Tables, FakeIO]:
    io = FakeIO()
    return Tables(cast(Session, None), cast(ContainerIO, io), KernelCache()), io


def whole(size: int = 4 * SEG, v: int | None = 5, **extra: object) -> dict[str, object]:
    t: dict[str, object] = {"name": "d", "size": size, "epoch": 1, "segment_size": SEG,
                            "containers": {"0": "/c0"}, "rows": [[0, size, NO_LUN, 0, ZERO]]}
    if v is not None:
        t["v"] = v
    t.update(extra)
    return t


def test_a_whole_table_without_a_stamp_counts_as_zero():
    u = TableUpdate.table(whole(v=None))
    assert u.whole and u.version == 0 and (u.start, u.end) == (0, 4 * SEG)
    assert u.containers == {0: "/c0"}


def test_an_answer_takes_its_range_from_its_rows():
    u = TableUpdate.answer({"rows": [[SEG, SEG, 0, 0, 0], [2 * SEG, SEG, 0, SEG, 0]],
                            "size": 4 * SEG, "epoch": 2, "v": 7, "containers": {"0": "/c0"}})
    assert (u.start, u.end, u.size, u.version) == (SEG, 3 * SEG, 4 * SEG, 7)
    empty = TableUpdate.answer({"rows": [], "size": SEG, "epoch": 2, "v": 7,
                                "containers": {}})
    assert empty.start is None and empty.end is None
    discard = TableUpdate.answer({"rows": [[0, SEG, NO_LUN, 0, ZERO]], "epoch": 3, "v": 8,
                                  "zero": [], "freed": [0, SEG]})
    assert discard.size is None and discard.containers is None


def test_compact_rows_in_an_answer_cover_the_whole_disk():
    cols = [bytes(8), (SEG).to_bytes(8, "little"), bytes(8), bytes(8), bytes(1)]
    u = TableUpdate.answer({"rows": encode_rows(cols), "size": 2 * SEG, "epoch": 2,
                            "v": 9, "containers": {}})
    assert (u.start, u.end) == (0, 2 * SEG)
    t, _ = tables()
    table = DiskTable("d", 2 * SEG, 1, [[0, 2 * SEG, NO_LUN, 0, ZERO]], 1)
    assert t.apply_update(table, u)
    assert table.allocated == SEG and table.version == 9
    with pytest.raises(TableError):
        TableUpdate.answer({"rows": encode_rows(cols), "epoch": 2})


def test_containers_are_set_only_when_sent():
    t, io = tables()
    table = t.new_table("d", TableUpdate.table(whole()))
    assert io.paths == {0: "/c0"} and io.calls == 1
    t.apply_update(table, TableUpdate.ranged({"start": 0, "end": SEG, "size": 4 * SEG,
                                              "epoch": 2, "rows": [[0, SEG, 1, 0, 0]],
                                              "v": 6, "containers": {"1": "/c1"}}))
    assert io.calls == 1, "an update's containers are not taken"
    t.apply_update(table, TableUpdate.answer({"rows": [[0, SEG, 1, 0, 0]], "size": 4 * SEG,
                                              "epoch": 2, "v": 7,
                                              "containers": {"1": "/c1"}}))
    assert io.paths == {0: "/c0", 1: "/c1"} and io.calls == 2


def test_an_open_answer_overtaken_by_a_push_is_all_restricted():
    t, _ = tables()
    t.note_push("d", 9)
    t.note_push("d", "x")  # not a stamp: ignored
    assert t.pushed("d") == 9
    table = t.new_table("d", TableUpdate.table(whole(v=5)))
    assert all(e.flags & INVALID for e in table)
    fresh = t.new_table("d", TableUpdate.table(whole(v=9)))
    assert not any(e.flags & INVALID for e in fresh)


def test_an_answer_without_rows_brings_its_size_unless_stale():
    t, _ = tables()
    table = t.new_table("d", TableUpdate.table(whole(v=5)))
    stale = TableUpdate.answer({"rows": [], "size": SEG, "epoch": 3, "v": 4,
                                "containers": {}})
    assert not t.apply_update(table, stale)
    assert table.size == 4 * SEG
    newer = TableUpdate.answer({"rows": [], "size": SEG, "epoch": 3, "v": 6,
                                "containers": {}})
    assert not t.apply_update(table, newer)
    assert table.size == SEG and table.epoch == 1 and table.version == 5


def test_an_empty_range_pushed_resizes_and_takes_the_stamp():
    t, _ = tables()
    table = t.new_table("d", TableUpdate.table(whole(v=5)))
    u = TableUpdate.ranged({"push": "update", "disk": "d", "start": 2 * SEG, "end": 2 * SEG,
                            "size": 2 * SEG, "epoch": 4, "rows": [], "v": 6, "drain": True})
    assert u.drain and t.apply_update(table, u)
    assert (table.size, table.epoch, table.version) == (2 * SEG, 4, 6)


def test_a_stale_range_is_restricted_not_applied():
    t, _ = tables()
    table = t.new_table("d", TableUpdate.table(whole(v=5)))
    u = TableUpdate.ranged({"start": 0, "end": SEG, "size": 4 * SEG, "epoch": 2,
                            "rows": [[0, SEG, 0, 0, 0]], "v": 4})
    assert not t.apply_update(table, u)
    assert [e.flags for e in table.pieces(0, 2 * SEG)] == [ZERO | INVALID, ZERO]


def test_a_stale_whole_table_restricts_everything():
    t, _ = tables()
    table = t.new_table("d", TableUpdate.table(whole(v=5)))
    assert not t.apply_update(table, TableUpdate.table(whole(size=SEG, v=3)))
    assert table.size == 4 * SEG and all(e.flags & INVALID for e in table)
    assert t.apply_update(table, TableUpdate.table(whole(size=SEG, v=6)))
    assert table.size == SEG and table.version == 6
