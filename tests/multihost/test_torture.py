"""The torture run (tests/multihost/torture.py) in CI, and the bugs it found, each as a reproducer.

The CI run is short (VIRTFS_TORTURE_OPS operations, default 1500, a fixed seed unless
VIRTFS_TORTURE_SEED is set); ``make torture SEED=... OPS=...`` runs long ones.
"""

from __future__ import annotations

import os

import pytest
from rig import add_container, agent, check_clean, vd
from torture import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    Torture,
    TortureFailure,
    fallocate,
)

SEED = int(os.environ.get("VIRTFS_TORTURE_SEED", "20261129"))
OPS = int(os.environ.get("VIRTFS_TORTURE_OPS", "800"))


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
    Snapshots.unshare_tail)."""
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


def test_punch_of_a_segment_a_snapshot_shares_reads_zeros(controller, mount_factory,
                                                          tmp_path):
    """Found by the torture run (seed 4, op #171: a read of d1 after "snap create d1@s5"
    and a punch over whole segments the snapshot shared returned the old data): the
    discard recorded disk.unmap only when it had storage to punch, and a segment shared
    with a snapshot has none (the snapshot keeps it), so the disk kept mapping it
    (controller/service/disks.py, disk_discard)."""
    add_container(controller, "c1", tmp_path / "c1.img", "64M")
    vd(controller, "disk", "create", "d", "--size", "8M", "--segment-size", "1M")
    m = agent(mount_factory, controller)
    data = os.urandom(4 << 20)
    with open(m.path / "d", "r+b") as f:
        f.write(data)
        os.fsync(f.fileno())
    vd(controller, "snap", "create", "d@s")
    fd = os.open(m.path / "d", os.O_RDWR)
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 512 << 10, 3 << 20)
    finally:
        os.close(fd)
    want = data[: 512 << 10] + bytes(3 << 20) + data[(7 << 19):] + bytes(4 << 20)
    assert (m.path / "d").read_bytes() == want
    assert (m.path / "d@s").read_bytes() == data + bytes(4 << 20)
    assert vd(controller, "disk", "info", "d", "--format", "json").json()["allocated"] \
        == 2 << 20  # the partial first and last segments; the two whole ones unmapped
    check_clean(controller)
