"""The agent's O(1) freeze (DiskTable.fence, the "freeze" push; docs/snapshots.md):
every entry held at the fence turns nowrite; only an answer at least as new as the
freeze installs writable entries again; an older one (replies and pushes can be
handled out of order) only restricts what it covers."""

from __future__ import annotations

from controller.protocol import INVALID, NO_LUN, NOWRITE, ZERO
from virtfs.mapcache import DiskTable

MiB = 1 << 20
SIZE = 16 * MiB


def _rows(flags: int = 0) -> list[list[int]]:
    """Four 4 MiB entries on LUN 1, the last a zero gap."""
    return [[0, 4 * MiB, 1, 0, flags], [4 * MiB, 4 * MiB, 1, 64 * MiB, flags],
            [8 * MiB, 4 * MiB, 1, 8 * MiB, flags], [12 * MiB, 4 * MiB, NO_LUN, 0, ZERO]]


def _writable(t: DiskTable, pos: int, length: int = 4096) -> bool:
    return all(not e.flags & (NOWRITE | INVALID | ZERO) for e in t.pieces(pos, length))


def test_fence_makes_every_entry_nowrite_and_keeps_reads() -> None:
    t = DiskTable("d", SIZE, 1, _rows(), version=5)
    assert _writable(t, 0) and _writable(t, 8 * MiB)
    t.fence(6)
    assert t.version == 6
    for e in t:
        assert e.flags & NOWRITE or e.flags & ZERO
    assert not any(_writable(t, p) for p in range(0, 12 * MiB, MiB))
    # reads go on: the entries keep their place (lun, offset) and are not invalid
    (e,) = t.pieces(4 * MiB + 4096, 4096)
    assert (e.lun, e.offset, e.flags & INVALID) == (1, 64 * MiB + 4096, 0)


def test_older_update_after_freeze_does_not_make_entries_writable() -> None:
    t = DiskTable("d", SIZE, 1, _rows(), version=5)
    t.fence(7)
    # an update push (or fault answer) stamped before the freeze, handled after it
    assert not t.replace(0, 8 * MiB, _rows()[:2], version=6)
    assert not _writable(t, 0) and not _writable(t, 4 * MiB)
    assert all(e.flags & INVALID for e in t.pieces(0, 8 * MiB))  # it faults instead
    assert not _writable(t, 8 * MiB)  # and outside its range the fence holds
    # an older whole table (a reload answered before the freeze) only restricts
    assert not t.load(SIZE, 1, _rows(), version=6)
    assert not any(_writable(t, p) for p in range(0, SIZE, MiB))


def test_newer_answer_is_as_sent_and_splits_keep_the_fence() -> None:
    t = DiskTable("d", SIZE, 1, _rows(), version=5)
    t.fence(7)
    # a fault answer after the snapshot: one 4 KiB block copied on write (writable)
    assert t.replace(4 * MiB, 4 * MiB + 4096, [[4 * MiB, 4096, 2, 0, 0]], version=8)
    assert _writable(t, 4 * MiB)
    # the rest of the split entry is from before the fence: still nowrite
    assert not _writable(t, 4 * MiB + 4096) and not _writable(t, 8 * MiB - 4096)
    assert not _writable(t, 0)
    # a nowrite answer stays nowrite (the controller says so: shared with the snapshot)
    assert t.replace(0, 4 * MiB, [[0, 4 * MiB, 1, 0, NOWRITE]], version=9)
    assert not _writable(t, 0)
    # growing adds a zero entry of the new generation; a newer whole table is as sent
    t.resize(SIZE + 4 * MiB)
    assert len(list(t.pieces(SIZE, 4 * MiB))) == 1
    assert t.load(SIZE, 2, _rows(), version=10)
    assert all(_writable(t, p) for p in range(0, 12 * MiB, MiB))
    t.fence(11)
    assert not any(_writable(t, p) for p in range(0, 12 * MiB, MiB))


def test_equal_version_answer_is_applied() -> None:
    """An answer built after the freeze's bump carries the same or a newer stamp and
    the frozen nowrite already: applied as sent (Coherence.rows)."""
    t = DiskTable("d", SIZE, 1, _rows(), version=5)
    t.fence(7)
    assert t.replace(0, 4 * MiB, [[0, 4 * MiB, 1, 0, NOWRITE]], version=7)
    assert t.replace(0, 4 * MiB, [[0, 4 * MiB, 1, 0, 0]], version=7)
    assert _writable(t, 0)
