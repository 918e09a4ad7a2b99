"""A move's new space (its alternate location, L2) is not zeroed when it is taken, and
whatever it held never shows (docs/movement.md, "The stored form"; issue 15: no flush
on a first write's path that it does not need).

The oracle: the target container's free space is filled with a stale pattern first,
and every zeroing of new space fails (the fault point placement.zero=eio after the
thick disk's creation): a migration and a copy-on-write after a snapshot go through,
and the disk, the snapshot and the migrated data read back exactly, never the pattern.
With L2 zeroed as thin allocations are, the migration's first move fails (EIO).
"""

from __future__ import annotations

import os

import pytest
from rig import FAULTS_ENV, add_container, agent, check_clean, dwrite, open_direct, vd

MIB = 1 << 20
STALE = b"\xee" * MIB


@pytest.fixture
def no_zeroing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Zeroing new space fails after the first time (the thick disk's creation). List it
    before `controller`, so the controller starts with it in its environment."""
    monkeypatch.setenv(FAULTS_ENV, "placement.zero=eio@2+")


def test_a_moves_new_space_is_never_zeroed_and_never_read_stale(no_zeroing, controller,
                                                                mount_factory, tmp_path):
    add_container(controller, "c1", tmp_path / "c1.img", "64M")
    add_container(controller, "c2", tmp_path / "c2.img", "64M")
    with open(tmp_path / "c2.img", "r+b") as f:  # past the label's first MiB: free space
        for off in range(MIB, 64 * MIB, MIB):
            f.seek(off)
            f.write(STALE)
    vd(controller, "disk", "create", "d", "--size", "16M", "--thick", "--container", "c1")
    m = agent(mount_factory, controller)
    data = bytearray(os.urandom(16 * MIB))
    with open(m.path / "d", "r+b") as f:
        f.write(data)
        os.fsync(f.fileno())
    vd(controller, "disk", "migrate", "d", "--to", "c2")  # four moves, none zeroed
    assert (m.path / "d").read_bytes() == data
    vd(controller, "snap", "create", "d@s")
    before = bytes(data)
    fd = open_direct(m.path / "d")
    try:  # a first write to each shared segment: copy-on-write into c2's free space
        for seg in range(4):
            off = seg * 4 * MIB + 8192
            block = os.urandom(4096)
            dwrite(fd, off, block)
            data[off:off + 4096] = block
        os.fsync(fd)
    finally:
        os.close(fd)
    assert (m.path / "d").read_bytes() == data
    assert (m.path / "d@s").read_bytes() == before
    log = controller.log_path.read_text()
    assert "fault point placement.zero" not in log  # nothing was zeroed after the create
    check_clean(controller)
