"""The O(1) freeze of `snap create` (a "freeze" push, docs/snapshots.md) with two agents
that have the disk open: each one's first write after the snapshot faults (its entries
were made nowrite by the push, not by rows) and is copied on write; the snapshot keeps
the old bytes (cmp through the mount), the disk has the new ones at both agents."""

from __future__ import annotations

import os
import time

from rig import (
    SEG,
    add_container,
    agent,
    check_clean,
    dread,
    dwrite,
    metrics_port,
    open_direct,
    sample,
    scrape,
    vd,
)

B = 4096


def nowrite_faults(port: int) -> float:
    """The agent's write faults on disk d's nowrite entries so far (its metrics)."""
    return sample(scrape(port), "virtfs_agent_faults_total", disk="d", reason="nowrite")


def test_first_write_after_snap_create_faults_at_each_agent(controller, mount_factory,
                                                             tmp_path):
    add_container(controller, "c1", tmp_path / "c1.img", "1G")
    vd(controller, "disk", "create", "d", "--size", "16M")
    args = ["--metrics", "127.0.0.1:0"]
    ma = agent(mount_factory, controller, "a", args=args)
    mb = agent(mount_factory, controller, "b", args=args)
    pa, pb = metrics_port(ma.log_path), metrics_port(mb.log_path)
    base = os.urandom(16 << 20)
    fd = open_direct(ma.path / "d")
    try:
        dwrite(fd, 0, base)
    finally:
        os.close(fd)
    fa, fb = open_direct(ma.path / "d"), open_direct(mb.path / "d")
    try:
        # both agents hold the whole table, writable: a write now does not fault
        dwrite(fa, SEG + 3 * B, base[SEG + 3 * B : SEG + 4 * B])
        dwrite(fb, 2 * SEG + 3 * B, base[2 * SEG + 3 * B : 2 * SEG + 4 * B])
        before = nowrite_faults(pa), nowrite_faults(pb)
        t0 = time.monotonic()
        vd(controller, "snap", "create", "d@s")
        assert time.monotonic() - t0 < 5
        new_a, new_b = os.urandom(B), os.urandom(B)
        dwrite(fa, SEG + 5 * B, new_a)  # agent a: segment 1
        dwrite(fb, 2 * SEG + 7 * B, new_b)  # agent b: segment 2
        after = nowrite_faults(pa), nowrite_faults(pb)
        assert after[0] > before[0] and after[1] > before[1], (before, after)
        # each agent reads the other's new block (pushed when the copy-on-write moved it)
        assert dread(fb, SEG + 5 * B, B) == new_a
        assert dread(fa, 2 * SEG + 7 * B, B) == new_b
    finally:
        os.close(fa)
        os.close(fb)
    model = bytearray(base)
    model[SEG + 5 * B : SEG + 6 * B] = new_a
    model[2 * SEG + 7 * B : 2 * SEG + 8 * B] = new_b
    for m in (ma, mb):  # the snapshot is the point in time, the disk has both writes
        assert (m.path / "d@s").read_bytes() == base
        assert (m.path / "d").read_bytes() == model
    check_clean(controller)
