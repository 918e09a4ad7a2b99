"""Faults around real mounts: agent and controller crashes, container I/O errors, full space.

Every test runs a standalone virtfs-controller (the ``controller`` fixture) and
agents as virtfs-mount subprocesses, so a crash takes down exactly one role.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from rig import (
    SEG,
    add_container,
    agent,
    check_clean,
    disk_info,
    dread,
    dwrite,
    open_direct,
    read_direct,
    run,
    vd,
    wait_for,
)

# ---------------------------------------------------------------- 1. agent kill -9


def test_agent_kill9_during_fsync_writes_keeps_fsynced_data(controller, mount_factory,
                                                            tmp_path):
    """kill -9 of the agent under fio --fsync=1: every write fio saw complete survives."""
    add_container(controller, "c1", tmp_path / "c1.img")
    vd(controller, "disk", "create", "d", "--size", "64M")
    m = agent(mount_factory, controller)
    job = ["fio", "--name=crash", f"--filename={m.path / 'd'}", "--size=64M", "--bs=4k",
           "--rw=randwrite", "--ioengine=psync", "--verify=crc32c", "--verify_fatal=1",
           "--fallocate=none", "--randrepeat=1", "--randseed=99", "--direct=1"]
    work = tmp_path / "fio"  # fio keeps its verify state file in its cwd
    work.mkdir()
    with open(tmp_path / "fio-write.log", "wb") as log:
        p = subprocess.Popen([*job, "--do_verify=0", "--fsync=1", "--verify_state_save=1",
                              "--status-interval=1"],
                             cwd=work, stdout=log, stderr=subprocess.STDOUT)

    def writes_done() -> int:  # from fio's last status report (one a second)
        out = (tmp_path / "fio-write.log").read_text(errors="replace")
        done = re.findall(r"issued rwts: total=\d+,(\d+),", out)
        return int(done[-1]) if done else 0

    try:
        wait_for(lambda: disk_info(controller, "d")["allocated"] >= 8 * SEG, 15,
                 "fio to allocate segments")
        # enough fsynced writes to mean something, however slow the machine is today
        wait_for(lambda: writes_done() >= 600, 120, "fio to complete 600 writes")
        assert p.poll() is None, "fio finished before the crash; make the job larger"
        m.kill9()
        rc = p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    out = (tmp_path / "fio-write.log").read_text(errors="replace")
    assert rc != 0, f"fio did not notice the agent dying:\n{out}"
    assert list(work.glob("*verify.state")), f"fio saved no verify state:\n{out}"

    m2 = agent(mount_factory, controller)
    r = run([*job, "--verify_only", "--verify_state_load=1"], cwd=work, check=False)
    assert r.returncode == 0, f"acknowledged writes lost after kill -9:\n{r.stdout}\n{r.stderr}"
    # it checked every block the first run wrote (issued rwts: total=READS,WRITES,...)
    wrote = writes_done()  # the final report: every write fio issued
    verified = int(re.search(r"issued rwts: total=(\d+),", r.stdout).group(1))
    assert wrote >= 500 and verified >= wrote - 1, (wrote, verified)
    check_clean(controller)

    # the oracle can fail: garbage over every allocated byte, behind virtfs' back
    entries = vd(controller, "disk", "map", "d", "--format", "json").json()["entries"]
    with open(tmp_path / "c1.img", "r+b") as f:
        for e in entries:
            if e["offset"] is not None:
                f.seek(e["offset"])
                f.write(b"\xa5" * e["length"])
    r = run([*job, "--verify_only", "--verify_state_load=1"], cwd=work, check=False)
    assert r.returncode != 0 and "verify" in (r.stdout + r.stderr).lower()
    assert os.path.ismount(m2.path)


# ---------------------------------------------------------------- 2. controller kill -9


def test_controller_kill9_allocated_writes_go_on_and_allocation_waits(
        controller, mount_factory, tmp_path):
    add_container(controller, "c1", tmp_path / "c1.img")
    vd(controller, "disk", "create", "d", "--size", "64M")
    m = agent(mount_factory, controller)
    disk = m.path / "d"
    want = bytearray(64 << 20)
    fd = open_direct(disk)
    try:
        first = os.urandom(SEG)
        dwrite(fd, 0, first)  # allocates segment 0
        os.fsync(fd)
        want[0:SEG] = first
        assert disk_info(controller, "d")["allocated"] == SEG

        controller.kill()
        t0 = time.monotonic()
        # allocated segment: straight to the container, no controller needed
        for off in (1 << 20, 3 << 20):
            data = os.urandom(256 << 10)
            dwrite(fd, off, data)
            os.fsync(fd)
            want[off : off + len(data)] = data
        pat = tmp_path / "pat"
        pat.write_bytes(os.urandom(128 << 10))
        run(["dd", f"if={pat}", f"of={disk}", "bs=4096", f"seek={(2 << 20) // 4096}",
             "conv=notrunc,fsync", "oflag=direct", "status=none"], timeout=10)
        want[2 << 20 : (2 << 20) + (128 << 10)] = pat.read_bytes()
        assert time.monotonic() - t0 < 5, "writes to allocated space waited for the controller"
        assert dread(fd, 0, SEG) == want[0:SEG]

        # a never-written segment needs the controller: the write waits for it
        new = tmp_path / "new"
        new.write_bytes(os.urandom(1 << 20))
        with open(tmp_path / "dd.log", "wb") as log:
            p = subprocess.Popen(["dd", f"if={new}", f"of={disk}", "bs=1M", "seek=20",
                                  "conv=notrunc,fsync", "oflag=direct", "status=none"],
                                 stderr=log)
        try:
            time.sleep(2)
            assert p.poll() is None, (f"an allocating write finished with the controller "
                                      f"down: rc {p.returncode}")
            controller.start()
            p.wait(30)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == 0, (tmp_path / "dd.log").read_text()
        want[20 << 20 : 21 << 20] = new.read_bytes()
        assert dread(fd, 0, 24 << 20) == want[: 24 << 20]
    finally:
        os.close(fd)
    assert disk_info(controller, "d")["allocated"] == 2 * SEG
    check_clean(controller)

    # everything acknowledged (fsynced) is still there through a new agent after a crash
    m.kill9()
    m2 = agent(mount_factory, controller)
    assert read_direct(m2.path / "d", 0, 64 << 20) == want


def test_controller_down_allocating_write_eio_after_fault_timeout(controller, mount_factory,
                                                                  tmp_path):
    add_container(controller, "c1", tmp_path / "c1.img")
    vd(controller, "disk", "create", "d", "--size", "64M")
    m = agent(mount_factory, controller, args=["--fault-timeout", "2"])
    fd = open_direct(m.path / "d")
    try:
        a = os.urandom(1 << 20)
        dwrite(fd, 0, a)
        os.fsync(fd)
        controller.kill()
        t0 = time.monotonic()
        with pytest.raises(OSError) as ei:
            dwrite(fd, 5 * SEG, os.urandom(1 << 20))
        waited = time.monotonic() - t0
        assert ei.value.errno == errno.EIO, ei.value
        assert 1.0 < waited < 20, f"EIO after {waited:.1f} s with --fault-timeout 2"
        # the mount is up and allocated space still works (well within the lease)
        assert os.path.ismount(m.path)
        b = os.urandom(1 << 20)
        dwrite(fd, 1 << 20, b)
        os.fsync(fd)
        assert dread(fd, 0, 2 << 20) == a + b
        assert dread(fd, 5 * SEG, 1 << 20) == bytes(1 << 20)  # the failed write left nothing

        def reconnected() -> bool:
            rows = vd(controller, "agent", "ls", "--format", "json").json()
            return [r["disks"] for r in rows if r["connected"]] == [["d"]]

        controller.start()
        wait_for(reconnected, 15, "the agent to reconnect and reopen d")
        c = os.urandom(1 << 20)
        dwrite(fd, 5 * SEG, c)
        os.fsync(fd)
        assert dread(fd, 5 * SEG, 1 << 20) == c
        assert dread(fd, 0, 2 << 20) == a + b
        # and once more: the agent survives every reconnection, not only the first
        controller.restart()
        wait_for(reconnected, 15, "the agent to reconnect a second time")
        dwrite(fd, 6 * SEG, c)
        os.fsync(fd)
        assert dread(fd, 6 * SEG, 1 << 20) == c
    finally:
        os.close(fd)
    assert disk_info(controller, "d")["allocated"] == 3 * SEG
    check_clean(controller)


def test_agent_notices_a_controller_restart_at_once(controller, mount_factory, tmp_path):
    """After a controller restart, an allocating write succeeds within --fault-timeout.

    The agent must notice the dropped connection when it drops, not at its next
    heartbeat (lease/3 = 10 s here), or the write fails with EIO while the
    controller is up.
    """
    controller.stop()
    controller.start(["--lease", "30"])
    add_container(controller, "c1", tmp_path / "c1.img")
    vd(controller, "disk", "create", "d", "--size", "64M")
    m = agent(mount_factory, controller, args=["--fault-timeout", "2"])
    fd = open_direct(m.path / "d")
    try:
        dwrite(fd, 0, os.urandom(1 << 20))
        for seg in (1, 2):
            controller.stop()
            controller.start(["--lease", "30"])
            data = os.urandom(1 << 20)
            dwrite(fd, seg * SEG, data)  # EIO here if the agent is still on the old link
            os.fsync(fd)
            assert dread(fd, seg * SEG, 1 << 20) == data
    finally:
        os.close(fd)
    assert "Traceback" not in m.log()


# ---------------------------------------------------------------- 4. container I/O errors


def test_container_read_eio_is_reported_and_mount_stays(controller, mount_factory, tmp_path):
    bad = (tmp_path / "bad.img").resolve()  # strace -P matches the resolved path
    add_container(controller, "bad", bad, "256M")
    add_container(controller, "good", tmp_path / "good.img", "256M")
    vd(controller, "disk", "create", "d1", "--size", "16M", "--container", "bad")
    vd(controller, "disk", "create", "d2", "--size", "16M", "--container", "good")
    strace = ["strace", "-f", "-o", "/dev/null", "-P", str(bad), "-e", "trace=pread64,pwrite64",
              "-e", "inject=pread64:error=EIO:when=1+"]
    m = agent(mount_factory, controller, prefix=strace)
    d1, d2 = m.path / "d1", m.path / "d2"
    x, y = os.urandom(1 << 20), os.urandom(1 << 20)
    for path, data in ((d1, x), (d2, y)):
        fd = open_direct(path)
        try:
            dwrite(fd, 0, data)  # writes are not injected: they reach the container
            os.fsync(fd)
        finally:
            os.close(fd)
    # the data did reach the container, so the EIO below is the injection's
    entries = vd(controller, "disk", "map", "d1", "--format", "json").json()["entries"]
    with open(bad, "rb") as f:
        f.seek(entries[0]["offset"])
        assert f.read(1 << 20) == x

    for _ in range(2):
        with pytest.raises(OSError) as ei:
            read_direct(d1, 0, 1 << 20)
        assert ei.value.errno == errno.EIO
    assert read_direct(d1, 8 << 20, 4096) == bytes(4096)  # a hole needs no container I/O
    assert os.path.ismount(m.path)
    os.statvfs(m.path)
    assert read_direct(d2, 0, 1 << 20) == y  # the other container's disk still works
    fd = open_direct(d2)
    try:
        z = os.urandom(1 << 20)
        dwrite(fd, 4 << 20, z)
        os.fsync(fd)
        assert dread(fd, 4 << 20, 1 << 20) == z
    finally:
        os.close(fd)
    assert "read on d1" in m.log() and "Input/output error" in m.log()
    wait_for(lambda: "agent reports an I/O error on disk 'd1', container bad"
             in controller.log_path.read_text(errors="replace"), 10,
             "the controller to log the agent's I/O error report")
    assert "Traceback" not in m.log()


@pytest.mark.parametrize("syscall", ["pwrite64", "fdatasync"])
def test_container_write_or_sync_eio(controller, mount_factory, tmp_path, syscall):
    """A failing container write (or its fdatasync) is EIO to the writer (or fsync)."""
    bad = (tmp_path / "bad.img").resolve()
    add_container(controller, "bad", bad, "256M")
    add_container(controller, "good", tmp_path / "good.img", "256M")
    vd(controller, "disk", "create", "d1", "--size", "16M", "--container", "bad")
    vd(controller, "disk", "create", "d2", "--size", "16M", "--container", "good")
    strace = ["strace", "-f", "-o", "/dev/null", "-P", str(bad), "-e",
              "trace=pread64,pwrite64,fdatasync", "-e", f"inject={syscall}:error=EIO:when=1+"]
    m = agent(mount_factory, controller, prefix=strace)
    fd = open_direct(m.path / "d1")
    try:
        for _ in range(2):  # and again: the mount did not go away
            with pytest.raises(OSError) as ei:
                dwrite(fd, 0, os.urandom(1 << 20))
                os.fsync(fd)
            assert ei.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert os.path.ismount(m.path)
    fd = open_direct(m.path / "d2")
    try:
        y = os.urandom(1 << 20)
        dwrite(fd, 0, y)
        os.fsync(fd)
        assert dread(fd, 0, 1 << 20) == y
    finally:
        os.close(fd)
    assert ("write on d1" if syscall == "pwrite64" else "fsync of d1") in m.log()
    assert "Traceback" not in m.log()
    check_clean(controller)


# ---------------------------------------------------------------- 5. full space


@pytest.fixture
def tiny_tmpfs(tmp_path):
    d = tmp_path / "tiny"
    d.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)])
    try:
        yield d
    finally:
        if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_full_container_file_gives_enospc(controller, mount_factory, tmp_path, tiny_tmpfs):
    """The container's file system fills up (1 MiB tmpfs behind a 64M container)."""
    add_container(controller, "small", tiny_tmpfs / "c.img", "64M")
    add_container(controller, "c1", tmp_path / "c1.img", "256M")
    vd(controller, "disk", "create", "d", "--size", "32M", "--container", "small")
    vd(controller, "disk", "create", "other", "--size", "16M", "--container", "c1")
    m = agent(mount_factory, controller)
    try:
        chunk = 64 << 10
        written = bytearray()
        fd = os.open(m.path / "d", os.O_RDWR)
        try:
            with pytest.raises(OSError) as ei:
                for off in range(0, 8 << 20, chunk):
                    data = os.urandom(chunk)
                    assert os.pwrite(fd, data, off) == chunk
                    written += data
            assert ei.value.errno == errno.ENOSPC, ei.value
            assert 512 << 10 <= len(written) <= 1 << 20
            os.fsync(fd)
            # still full: the next write fails the same way, nothing is torn down
            with pytest.raises(OSError) as ei:
                os.pwrite(fd, os.urandom(chunk), len(written))
            assert ei.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        assert os.path.ismount(m.path)
        assert read_direct(m.path / "d", 0, len(written)) == written
        check_clean(controller)
        # other containers' disks still take writes
        fd = open_direct(m.path / "other")
        try:
            z = os.urandom(1 << 20)
            dwrite(fd, 0, z)
            os.fsync(fd)
            assert dread(fd, 0, 1 << 20) == z
        finally:
            os.close(fd)
        assert "Traceback" not in m.log()
    finally:
        m.close()  # the agent holds the container open: stop it before the tmpfs goes


def test_pool_exhaustion_gives_enospc(controller, mount_factory, tmp_path):
    """The controller has no space left to allocate: ENOSPC to the writer."""
    add_container(controller, "c8", tmp_path / "c8.img", "9M")  # 8M + its label's 1M
    vd(controller, "disk", "create", "d", "--size", "32M", "--container", "c8")
    m = agent(mount_factory, controller)
    data = os.urandom(8 << 20)
    fd = open_direct(m.path / "d")
    try:
        dwrite(fd, 0, data)
        os.fsync(fd)
        for off in (8 << 20, 20 << 20):
            with pytest.raises(OSError) as ei:
                dwrite(fd, off, os.urandom(4096))
            assert ei.value.errno == errno.ENOSPC, ei.value
        assert dread(fd, 0, 8 << 20) == data
        assert dread(fd, 8 << 20, 4096) == bytes(4096)
    finally:
        os.close(fd)
    assert os.path.ismount(m.path)
    info = disk_info(controller, "d")
    assert info["allocated"] == 8 << 20
    [c8] = vd(controller, "container", "ls", "--format", "json").json()
    assert c8["used"] == 8 << 20 and c8["free"] == 0
    check_clean(controller)
    assert "Traceback" not in m.log()


BIN = Path(sys.executable).parent


def test_container_inside_a_virtfs_mount_is_refused(embedded: Any, tmp_path: Path) -> None:
    """By the path's file system, not its prefix: a symlink into the mount is refused too,
    and nothing hangs (before the fix: agent, controller and writer hung in the kernel)."""
    mnt = embedded.path
    state = embedded.state_dir
    vd = [str(BIN / "vdctl"), "--state-dir", str(state)]
    subprocess.run([*vd, "disk", "create", "inner", "--size", "64M"], check=True,
                   capture_output=True, timeout=30)
    link = tmp_path / "elsewhere"
    link.symlink_to(mnt / "inner")
    for path, size in ((mnt / "inner", []), (link, []), (mnt / "newfile", ["--size", "64M"])):
        r = subprocess.run([*vd, "container", "add", "rec", str(path), *size],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 1, (path, r.stdout, r.stderr)
        assert "inside the virtfs mount" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    # the oracle can pass: a container outside the mount is accepted
    r = subprocess.run([*vd, "container", "add", "ok", str(tmp_path / "ok.img"), "--size",
                        "64M"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in mnt.iterdir()) == ["inner"]  # the mount still answers
