"""The data path's fast paths (virtfs/datapath.py; the C one of reads, virtfs/cfast.py)
on real mounts, and --max-background.

The fast path stops using an entry the moment it is restricted:
a disk migrates to another container under several fio jobs writing with --verify
(O_DIRECT through the mount, so every 4 KiB write is a request the agent serves, on
the fast path while its entry is plain). A write that went to the old container
after the move took its segment would read back wrong in fio's verify pass. With the C
readers on (VIRTFS_FAST_THREADS), fio also verifies as it goes (--verify_backlog), so
reads served in C before, during and after the move read what was written: a C table
still pointing at the old container after the move would read there and fail.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from rig import FIO_VERIFY, ControllerProc, add_container, agent, check_clean, vd, wait_for

MiB = 1 << 20


def on(c: ControllerProc, name: str) -> set[str | None]:
    rows = vd(c, "disk", "map", name, "--format", "json").json()["entries"]
    return {e["container"] for e in rows if e["container"] is not None}


def migrate_under_fio(controller: ControllerProc, mount_factory, tmp_path: Path,
                      numjobs: int, size: int, env: dict[str, str] | None = None,
                      extra: tuple[str, ...] = ()) -> Any:
    add_container(controller, "c1", tmp_path / "c1.img", "512M")
    add_container(controller, "c2", tmp_path / "c2.img", "512M")
    vd(controller, "disk", "create", "d", "--size", str(size), "--container", "c1",
       "--thick")
    m = agent(mount_factory, controller, env=env)
    assert on(controller, "d") == {"c1"}
    per_job = size // numjobs
    work = tmp_path / "fio"
    work.mkdir()
    p = subprocess.Popen(
        ["fio", "--name=v", f"--filename={m.path / 'd'}", *FIO_VERIFY, "--do_verify=1",
         "--randseed=5", "--direct=1", f"--numjobs={numjobs}", f"--size={per_job}",
         f"--offset_increment={per_job}", *extra],
        cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1.0)  # fio is writing
        assert p.poll() is None, "fio ended before the migration"
        r = vd(controller, "disk", "migrate", "d", "--to", "c2")
        assert "done" in r.err
        if p.poll() is not None:
            raise AssertionError("the move did not overlap fio's writes: "
                                 + p.communicate()[0][-3000:])
        out = p.communicate(timeout=300)[0]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, out[-3000:]
    assert on(controller, "d") == {"c2"}
    check_clean(controller)
    return m


def c_served(m: Any) -> tuple[int, int]:
    """Unmount m; the reads and writes its C fast path served (it says so on stderr at
    exit)."""
    assert m.unmount() == 0
    found = re.findall(r"the C fast path served (\d+) reads and (\d+) writes", m.log())
    assert found, m.log()[-2000:]
    return int(found[-1][0]), int(found[-1][1])


def test_migrate_under_4_fio_jobs_with_verify_c_path(controller, mount_factory, tmp_path):
    # (loops: in C one pass of the writes can end before the move does)
    m = migrate_under_fio(controller, mount_factory, tmp_path, 4, 32 * MiB,
                          env={"VIRTFS_FAST_THREADS": "2"},
                          extra=("--verify_backlog=16", "--loops=8"))
    reads, writes = c_served(m)
    assert reads > 1000 and writes > 1000


def test_migrate_under_4_fio_jobs_with_verify(controller, mount_factory, tmp_path):
    assert os.environ.get("VIRTFS_FASTPATH", "1") != "0"  # the path under test
    migrate_under_fio(controller, mount_factory, tmp_path, 4, 32 * MiB,
                      env={"VIRTFS_FAST_THREADS": "0"})  # the Python fast path


@pytest.mark.slow
def test_migrate_under_16_fio_jobs_with_verify(controller, mount_factory, tmp_path):
    migrate_under_fio(controller, mount_factory, tmp_path, 16, 256 * MiB)


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.ismount("/sys/fs/fuse/connections"),
                    reason="needs root and fusectl mounted on /sys/fs/fuse/connections")
@pytest.mark.parametrize(("arg", "want"), [(None, (64, 48)), ("40", (40, 30))])
def test_max_background_is_raised(mount_factory, arg, want):
    m = mount_factory("mb", args=["--default-container-size", "8M",
                                  *(["--max-background", arg] if arg else [])])
    conn = f"/sys/fs/fuse/connections/{os.minor(os.stat(m.path).st_dev)}"

    def values() -> tuple[int, int]:
        with open(f"{conn}/max_background") as a, open(f"{conn}/congestion_threshold") as b:
            return int(a.read()), int(b.read())

    wait_for(lambda: values() == want, 10, f"max_background {want} (have {values()})")
