"""A whole-table answer of a disk that shares storage with a snapshot (or of a
snapshot, or of a frozen disk) goes in the compact columns, chunks still shared
copied as they are and made nowrite (Coherence._shared_columns): it must load to the
same table as the row list (Coherence.rows) gives, entry by entry (zero gaps aside:
see _norm)."""

from __future__ import annotations

import random
from typing import Any, cast

import pytest
import trio

from controller import protocol as P
from controller.records import ContainerAdd, DiskCreate, DiskMap, DiskUnmap, SnapCreate
from controller.service import Service
from controller.state import State
from virtfs.mapcache import DiskTable

SEG = 4096


def _norm(t: DiskTable) -> list[P.Entry]:
    """The entries, a zero gap's nowrite dropped: a write there faults either way (the
    compact form has no flags for gaps; rows() gives a snapshot's or a frozen disk's
    gaps nowrite too)."""
    return [e._replace(flags=e.flags & ~P.NOWRITE) if e.flags & P.ZERO else e for e in t]


class _Durable:
    strict_seq = 0  # Journal.strict_seq: what answers wait for

    async def wait_durable(self, seq: int) -> None:
        return None


@pytest.mark.parametrize("seed", [1, 2])
def test_shared_answer_compact_equals_rows(tmp_path: Any, seed: int) -> None:
    rnd = random.Random(seed)
    nseg = 6000
    st = State()
    st.apply(ContainerAdd("c0", 1, "/nonexistent/c0", 8 * nseg * SEG, True), 1)
    st.apply(DiskCreate("d", nseg * SEG + 1000, SEG, False, None, 1, 0.0, []), 2)
    order = list(range(nseg))
    rnd.shuffle(order)
    seq = 2
    for k, i in enumerate(order[: nseg * 3 // 4]):  # a quarter stays unallocated
        seq += 1
        st.apply(DiskMap("d", [(i * SEG, SEG, 1, 2 * k * SEG)]), seq)
    seq += 1
    st.apply(SnapCreate("d", "s", 1.0), seq)
    d = st.disks["d"]
    # the first third changes after the snapshot (unmapped, remapped elsewhere), the
    # rest stays shared: chunks held as they are, and copies of them
    for _ in range(60):
        i = rnd.randrange(nseg // 3)
        seq += 1
        st.apply(DiskUnmap("d", i * SEG, (i + rnd.randrange(1, 3)) * SEG), seq)
        if rnd.random() < 0.5:
            (off, n), = st.luns[1].space.plan(SEG)
            seq += 1
            st.apply(DiskMap("d", [(i * SEG, n, 1, off)]), seq)
    d.extents._own(len(d.extents._chunks) - 1)  # a copy, unchanged

    async def check() -> None:
        svc = Service(st, cast(Any, _Durable()), str(tmp_path))
        co = svc.coherence
        for t, frozen in ((d, False), (st.snaps["d@s"], False), (d, True)):
            if frozen:
                co._frozen[t.uid] = [(0, P.MAX_DISK_SIZE)]
            co._restricted[t.uid] = [(5 * SEG + 7, 9 * SEG)]
            ans = await co.answer(t, 0, t.size)
            assert isinstance(ans["rows"], dict), t.name  # compact
            got = DiskTable("x", t.size, 1, ans["rows"])
            want = DiskTable("x", t.size, 1, co.rows(t, 0, t.size))
            assert _norm(got) == _norm(want), (t.name, frozen)
            nowrite = sum(1 for e in got if e.flags & P.NOWRITE)
            assert nowrite > 0
            if t is d and not frozen:
                assert nowrite < len(got)  # what changed is writable
            co._frozen.pop(t.uid, None)
            co._restricted.pop(t.uid, None)

    trio.run(check)
