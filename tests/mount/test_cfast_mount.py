"""The C fast path of reads (virtfs/cfast.py, virtfs/_fastio.c) on real mounts.

fio writes with O_DIRECT and verifies what it reads back at 1, 4 and 16 jobs, with
two C readers on the FUSE fd: the reads of plain entries are served in C (the agent
says how many at exit), the writes and everything else in Python. The migration,
fencing and fio tests with the C path on are beside their Python-path twins
(test_fastpath_mount.py, test_fencing.py, test_mount_data.py).
"""

from __future__ import annotations

import subprocess

import pytest
from rig import BIN, FIO_VERIFY, add_container, agent, vd
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
    # every block was read back once by the verify pass: nearly all of them in C
    assert c_served(m) >= 64 * MiB // 4096 * 9 // 10


def test_fast_threads_out_of_range_is_refused(tmp_path):
    r = subprocess.run([str(BIN / "virtfs-mount"), str(tmp_path), "--fast-threads", "65"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--fast-threads must be between 0 and 64" in r.stderr
