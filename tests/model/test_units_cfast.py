"""The C fast path's tables (virtfs/cfast.py, virtfs/_fastio.c) without a mount: what a
disk's C table holds is DataPath.plain's answer, and every change that narrows it
empties the C table at once (the readers threads are not started here)."""

from __future__ import annotations

import os
from typing import Any, cast

import pytest
from test_units_fastpath import LUN, SEG, rig  # noqa: F401 (rig: the fixture)

from virtfs import cfast

pytestmark = pytest.mark.skipif(cfast.unavailable() is not None,
                                reason=f"the C fast path: {cfast.unavailable()}")


def table(cf: cfast.CFast, od: Any) -> list[tuple[int, int, bool, bool]]:
    """od's C table as (vstart, vend, may read, may write)."""
    assert cfast._fastio is not None
    return [(v, e, r, w) for v, e, _fd, _off, _lun, r, w in cfast._fastio.entries(od.cslot)]


@pytest.fixture
def cf(rig):  # noqa: F811
    data, od, session, fd = rig
    c = cfast.CFast(data, 2)
    c.bind(5, od, True)
    data.io.on_change = c.dirty_all
    yield c, data, od
    c.unbind(5)
    data.io.on_change = None


def test_published_table_is_plain(cf):
    c, data, od = cf
    assert table(c, od) == []  # nothing until an I/O reaches Python
    assert c.publish(od) == 3
    # valid segments read and write; the nowrite one reads only; the hole is not there
    assert table(c, od) == [(0, SEG, True, True), (SEG, 2 * SEG, True, True),
                            (2 * SEG, 3 * SEG, True, False)]


def test_every_narrowing_change_empties_it(cf):
    c, data, od = cf
    steps = [
        ("restrict", lambda: od.table.restrict(0, SEG),
         [(SEG, 2 * SEG, True, True), (2 * SEG, 3 * SEG, True, False)]),
        ("fence", lambda: od.table.fence(None),  # a freeze: nothing written from here
         [(SEG, 2 * SEG, True, False), (2 * SEG, 3 * SEG, True, False)]),
        ("resize", lambda: od.table.resize(SEG + SEG // 2), [(SEG, SEG + SEG // 2, True, False)]),
    ]
    for what, change, after in steps:
        c.publish(od)
        assert table(c, od), what
        change()
        assert table(c, od) == [], f"{what} left the C table as it was"
        c.publish(od)
        assert table(c, od) == after, what


def test_qos_grown_ahead_and_retired_fds_empty_it(cf):
    c, data, od = cf
    c.publish(od)
    od.qos = cast(Any, object())  # any limiter
    od.changed()
    assert table(c, od) == []
    assert c.publish(od) == 0  # a disk with QoS: Python only
    od.qos = None
    od.changed()
    assert c.publish(od) == 3
    od.grow.to, od.grow.eof = od.table.size, SEG  # grown ahead: the local end of file
    od.changed()
    assert table(c, od) == [] and c.publish(od) == 0
    od.grow.to, od.grow.eof = -1, None
    od.changed()
    assert c.publish(od) == 3
    data.io._fds[LUN] = os.dup(data.io._fds[LUN])  # (the fixture closes the first)
    c.publish(od)
    data.io._retire(LUN)  # the container's fd goes (a path change)
    assert table(c, od) == []
    assert c.publish(od) == 0  # nothing open to serve from


def test_last_handle_released_empties_it_and_frees_its_slot(cf):
    c, data, od = cf
    c.bind(6, od, False)
    c.publish(od)
    c.unbind(6)
    assert table(c, od)  # one handle left
    slot = od.cslot
    c.unbind(5)
    assert cfast._fastio.entries(slot) == []
    assert od.table.on_change is None and od.cslot == -1
    c.bind(5, od, True)  # the next open takes the free slot again (for the fixture too)
    assert od.cslot == slot and table(c, od) == []


def test_unavailable_says_why(monkeypatch):
    """Without the pyfuse3 patch or the extension the agent runs the Python path and
    says why (mount.py logs this line once)."""
    import pyfuse3
    monkeypatch.delattr(pyfuse3, "process_raw")
    assert "fastpath.patch" in (cfast.unavailable() or "")
    monkeypatch.undo()
    monkeypatch.setattr(cfast, "_fastio", None)
    monkeypatch.setattr(cfast, "_IMPORT_ERROR", "No module named 'virtfs._fastio'")
    assert "virtfs._fastio is not built" in (cfast.unavailable() or "")
    assert cfast.stats() == (0, 0, 0)
