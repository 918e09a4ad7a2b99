"""The C fast path of reads (virtfs/cfast.py, virtfs/_fastio.c) on real mounts.

fio writes with O_DIRECT and verifies what it reads back at 1, 4 and 16 jobs, with
two C readers on the FUSE fd: the reads and writes of plain entries are served in C
(the agent says how many at exit), everything else in Python. A write served in C
owes its container an fdatasync that fsync pays, as in Python. The migration,
fencing and fio tests with the C path on are beside their Python-path twins
(test_fastpath_mount.py, test_fencing.py, test_mount_data.py).
"""

from __future__ import annotations

import os
import subprocess

import pytest
from rig import (
    BIN,
    FIO_VERIFY,
    add_container,
    agent,
    dwrite,
    metrics_port,
    open_direct,
    sample,
    scrape,
    vd,
    wait_for,
)
from test_fastpath_mount import c_served

MiB = 1 << 20
C_ON = {"VIRTFS_FAST_THREADS": "2"}


@pytest.mark.parametrize("numjobs", [1, 4, 16])
def test_fio_verify_with_the_c_path(controller, mount_factory, tmp_path, numjobs):
    add_container(controller, "c1", tmp_path / "c1.img", "256M")
    vd(controller, "disk", "create", "d", "--size", "64M", "--container", "c1", "--thick")
    m = agent(mount_factory, controller, env=C_ON)
    per_job = 64 * MiB // numjobs
    work = tmp_path / "fio"
    work.mkdir()
    r = subprocess.run(
        ["fio", "--name=v", f"--filename={m.path / 'd'}", *FIO_VERIFY, "--do_verify=1",
         "--direct=1", f"--numjobs={numjobs}", f"--size={per_job}",
         f"--offset_increment={per_job}"],
        cwd=work, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    # every block was written once and read back once by the verify pass: nearly all
    # of them in C
    reads, writes = c_served(m)
    assert min(reads, writes) >= 64 * MiB // 4096 * 9 // 10


def test_fsync_pays_the_debts_of_writes_served_in_c(controller, mount_factory, tmp_path):
    """A write served in C owes an fdatasync of its container (blockio's sync debt), as
    one served in Python: the debt shows (virtfs_agent_unsynced_writes), and fsync on
    the disk pays it."""
    add_container(controller, "c1", tmp_path / "c1.img", "64M")
    vd(controller, "disk", "create", "d", "--size", "8M", "--container", "c1", "--thick")
    m = agent(mount_factory, controller, env=C_ON, args=["--metrics", "127.0.0.1:0"])
    port = metrics_port(m.log_path, "virtfs-mount")

    def debt() -> float:
        return sum(v for (name, _), v in scrape(port).items()
                   if name == "virtfs_agent_unsynced_writes")

    fd = open_direct(m.path / "d")
    try:
        os.fsync(fd)
        for i in range(64):
            dwrite(fd, i * 4096, bytes([i]) * 4096)
        wait_for(lambda: debt() >= 60, 10, "the C writes' sync debt")
        os.fsync(fd)
        wait_for(lambda: debt() == 0, 10, "fsync to pay the debt")
        d = {"disk": "d", "op": "write"}
        wait_for(lambda: sample(scrape(port), "virtfs_agent_io_total", **d) == 64, 10,
                 "the C writes in the metrics")
    finally:
        os.close(fd)
    assert c_served(m)[1] >= 60


def test_fast_threads_out_of_range_is_refused(tmp_path):
    r = subprocess.run([str(BIN / "virtfs-mount"), str(tmp_path), "--fast-threads", "65"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--fast-threads must be between 0 and 64" in r.stderr
