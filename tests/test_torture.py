"""The torture run (tests/torture.py) in CI, and the bugs it found, each as a reproducer.

The CI run is short (VIRTFS_TORTURE_OPS operations, default 1500, a fixed seed unless
VIRTFS_TORTURE_SEED is set); ``make torture SEED=... OPS=...`` runs long ones.
"""

from __future__ import annotations

import os

import pytest
from faultkit import add_container, agent, check_clean, vd
from torture import Torture, TortureFailure

SEED = int(os.environ.get("VIRTFS_TORTURE_SEED", "20261129"))
OPS = int(os.environ.get("VIRTFS_TORTURE_OPS", "1500"))


def test_torture_short_run(tmp_path):
    t = Torture(tmp_path / "t", SEED, OPS)
    try:
        t.run()
    except TortureFailure as e:
        pytest.fail(str(e), pytrace=False)
    assert t.counts["write"] and t.counts["read"] and t.counts["snap_read"]


def test_grow_a_disk_whose_partial_last_block_a_snapshot_shares(controller, mount_factory,
                                                                 tmp_path):
    """Found by the torture run (seed 2, op #1216: a write past the end of d1, whose size
    732765 was not block-aligned, after snap create d1@s3): growing the disk gives its
    shared last block storage of its own with a move starting at size - 1, which the
    state refuses (a move starts on a block boundary), so the write failed with EIO
    and vdctl disk resize with an internal error (controller/service/snapshots.py,
    _unshare_tail)."""
    add_container(controller, "c1", tmp_path / "c1.img", "64M")
    vd(controller, "disk", "create", "t", "--size", "5000", "--thick")
    m = agent(mount_factory, controller)
    data = os.urandom(5000)
    with open(m.path / "t", "r+b") as f:
        f.write(data)
        os.fsync(f.fileno())
    vd(controller, "snap", "create", "t@s")
    vd(controller, "disk", "resize", "t", "10000")
    with open(m.path / "t", "r+b") as f:  # and by a write past the end, as the run did
        f.seek(12000)
        f.write(b"x" * 100)
    assert (m.path / "t").read_bytes() == data + bytes(7000) + b"x" * 100
    assert (m.path / "t@s").read_bytes() == data
    check_clean(controller)
