"""The O(1) freeze of `snap create` (a "freeze" push, docs/snapshots.md) with two agents
that have the disk open: each one's first write after the snapshot faults (its entries
were made nowrite by the push, not by rows) and is copied on write; the snapshot keeps
the old bytes (cmp through the mount), the disk has the new ones at both agents."""

from __future__ import annotations

import os
import re
import time
import urllib.request
from pathlib import Path

from rig import SEG, add_container, agent, check_clean, dread, dwrite, open_direct, vd, wait_for

B = 4096


def _metrics_port(log: Path) -> int:
    found: list[int] = []

    def seen() -> bool:
        m = re.search(r"metrics at http://[^:]+:(\d+)/metrics", log.read_text())
        if m:
            found.append(int(m.group(1)))
        return bool(m)
    wait_for(seen, 15, "the agent's metrics address")
    return found[0]


def _nowrite_faults(port: int, disk: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    line = 'virtfs_agent_faults_total{disk="' + disk + '",reason="nowrite"} '
    m = re.search("^" + re.escape(line) + r"(\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_first_write_after_snap_create_faults_at_each_agent(controller, mount_factory,
                                                             tmp_path):
    add_container(controller, "c1", tmp_path / "c1.img", "1G")
    vd(controller, "disk", "create", "d", "--size", "16M")
    args = ["--metrics", "127.0.0.1:0"]
    ma = agent(mount_factory, controller, "a", args=args)
    mb = agent(mount_factory, controller, "b", args=args)
    pa, pb = _metrics_port(ma.log_path), _metrics_port(mb.log_path)
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
        before = _nowrite_faults(pa, "d"), _nowrite_faults(pb, "d")
        t0 = time.monotonic()
        vd(controller, "snap", "create", "d@s")
        assert time.monotonic() - t0 < 5
        new_a, new_b = os.urandom(B), os.urandom(B)
        dwrite(fa, SEG + 5 * B, new_a)  # agent a: segment 1
        dwrite(fb, 2 * SEG + 7 * B, new_b)  # agent b: segment 2
        after = _nowrite_faults(pa, "d"), _nowrite_faults(pb, "d")
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
