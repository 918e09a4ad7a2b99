"""The agent's durability and liveness promises (issue 6), each against a real mount.

fsync pays every unsynced write of the disk, whichever handle made it; a failed
container sync keeps failing; a failed open does not leak the disk; the agent
never waits on its own mount. fdatasync calls are observed with strace on the
agent (the real syscalls, not a counter of ours).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from rig import BLOCK, add_container, agent, dread, dwrite, open_direct, read_direct, vd, wait_for

from controller.client import open_controller

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def strace_syncs(log: Path, container: Path, inject: str | None = None) -> list[str]:
    """A prefix that runs the agent under strace, logging its fdatasync/fsync calls on
    container (an absolute, resolved path) to log, one line per call, at once."""
    cmd = ["strace", "-f", "-qq", "-e", "signal=none", "-o", str(log), "-P", str(container),
           "-e", "trace=fdatasync,fsync,pwrite64"]
    if inject:
        cmd += ["-e", f"inject={inject}"]
    return cmd


def syncs(log: Path) -> int:
    """fdatasync/fsync calls the agent has made on the container so far."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return sum(1 for line in text.splitlines() if "fdatasync(" in line or " fsync(" in line)


def writes(log: Path) -> int:
    text = log.read_text(errors="replace") if log.exists() else ""
    return sum(1 for line in text.splitlines() if "pwrite64(" in line)


def punch_hole(path: Path, offset: int, length: int) -> None:
    """fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE), and nothing else."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fd = os.open(path, os.O_RDWR)
    try:
        if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    finally:
        os.close(fd)


def admin_call(c: Any, op: str, **args: Any) -> Any:
    """One call to the controller as an admin client (for ops vdctl has no verb for)."""
    async def go() -> Any:
        async with open_controller("unix:" + str(c.sock), role="admin", name="test") as cl:
            return await cl.call(op, **args)
    return trio.run(go)


def fsync_path(path: Path) -> None:
    """What `sync FILE`, a restarted VM or a backup tool does: open anew, fsync, close."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- 1. fsync on a new handle


@pytest.mark.parametrize("how", ["dd", "direct", "rename", "admin-rename", "discard"])
def test_fsync_on_a_new_handle_syncs_earlier_writes(controller, mount_factory, tmp_path, how):
    """Write through one handle and close it; open the disk again and fsync: the agent
    must fdatasync the container (the writes are owed by the disk, not by the handle).
    Also across a rename of the disk (here, or by an admin client), and for the zeroing writes of
    a partial discard."""
    c1 = (tmp_path / "c1.img").resolve()
    add_container(controller, "c1", c1, "256M")
    vd(controller, "disk", "create", "d", "--size", "16M")
    log = tmp_path / "strace.log"
    m = agent(mount_factory, controller, prefix=strace_syncs(log, c1))
    d = m.path / "d"
    if how == "discard":
        fd = open_direct(d)  # allocate a segment and make it durable first
        try:
            dwrite(fd, 0, os.urandom(1 << 20))
            os.fsync(fd)
        finally:
            os.close(fd)
    before_w, before = writes(log), syncs(log)
    if how in ("dd", "rename", "admin-rename"):
        subprocess.run(["dd", "if=/dev/urandom", f"of={d}", "bs=64K", "count=4",
                        "conv=notrunc", "status=none"], check=True)
    elif how == "direct":
        fd = open_direct(d)
        try:
            dwrite(fd, 0, os.urandom(256 << 10))
        finally:
            os.close(fd)
    else:  # a punch inside one segment: the agent zeroes the range itself
        punch_hole(d, 4096, 8192)  # not fallocate(1): it fsyncs the file itself
    assert writes(log) > before_w, "the writes did not reach the container"
    assert syncs(log) == before, "something synced already: the test would prove nothing"
    time.sleep(1.5)  # the kernel's RELEASE is asynchronous: let the last close happen
    if how == "rename":
        os.rename(d, m.path / "e")
        d = m.path / "e"
    elif how == "admin-rename":  # elsewhere: this agent only hears "d is gone"
        admin_call(controller, "disk.rename", name="d", new="e")
        d = m.path / "e"
    fsync_path(d)
    assert syncs(log) > before, f"fsync on a new handle issued no fdatasync ({how})"
    # and paid: a second fsync has nothing left to sync
    after = syncs(log)
    fsync_path(d)
    assert syncs(log) == after


def test_fsync_pays_only_the_disks_own_debts(controller, mount_factory, tmp_path):
    """A disk that wrote nothing owes nothing: its fsync does not sync another disk's
    container, and the other disk's writes stay owed until its own fsync."""
    c1, c2 = (tmp_path / "c1.img").resolve(), (tmp_path / "c2.img").resolve()
    add_container(controller, "c1", c1, "64M")
    add_container(controller, "c2", c2, "64M")
    vd(controller, "disk", "create", "a", "--size", "8M", "--container", "c1")
    vd(controller, "disk", "create", "b", "--size", "8M", "--container", "c2")
    log = tmp_path / "strace.log"
    m = agent(mount_factory, controller, prefix=strace_syncs(log, c1))
    fd = open_direct(m.path / "a")
    try:
        dwrite(fd, 0, os.urandom(BLOCK))
    finally:
        os.close(fd)
    fsync_path(m.path / "b")
    assert syncs(log) == 0
    fsync_path(m.path / "a")
    assert syncs(log) == 1


# ---------------------------------------------------------------- 2. a failed sync sticks


def test_failed_container_sync_keeps_failing(controller, mount_factory, tmp_path):
    """One fdatasync fails with EIO (strace injects it once): Linux would report the lost
    pages to that call only, so every later fsync of a disk that wrote there must fail
    too, on this handle or a new one, and the controller hears of it."""
    bad, good = (tmp_path / "bad.img").resolve(), (tmp_path / "good.img").resolve()
    add_container(controller, "bad", bad, "64M")
    add_container(controller, "good", good, "64M")
    vd(controller, "disk", "create", "d1", "--size", "8M", "--container", "bad")
    vd(controller, "disk", "create", "d2", "--size", "8M", "--container", "good")
    log = tmp_path / "strace.log"
    m = agent(mount_factory, controller,
              prefix=strace_syncs(log, bad, inject="fdatasync:error=EIO:when=1"))
    fd = open_direct(m.path / "d1")
    try:
        dwrite(fd, 0, os.urandom(1 << 20))
        for _ in range(2):
            with pytest.raises(OSError) as ei:
                os.fsync(fd)
            assert ei.value.errno == errno.EIO
        dwrite(fd, 1 << 20, os.urandom(BLOCK))  # a write after the failure is owed too
    finally:
        os.close(fd)
    with pytest.raises(OSError) as ei:
        fsync_path(m.path / "d1")
    assert ei.value.errno == errno.EIO
    assert syncs(log) == 1, "the later fsyncs must not trust a second fdatasync"
    # the other container's disk is unaffected
    fd = open_direct(m.path / "d2")
    try:
        y = os.urandom(1 << 20)
        dwrite(fd, 0, y)
        os.fsync(fd)
        assert dread(fd, 0, 1 << 20) == y
    finally:
        os.close(fd)
    wait_for(lambda: "agent reports an I/O error on disk 'd1', container bad"
             in controller.log_path.read_text(errors="replace"), 10,
             "the controller to log the agent's report")
    assert "fdatasync failed" in m.log()
    assert "Traceback" not in m.log()


# ---------------------------------------------------------------- 3. a failed open


def test_open_trunc_that_fails_does_not_leak_the_disk(controller, mount_factory, tmp_path):
    """open(O_TRUNC) whose truncate fails (the controller waits for a paused agent's ack
    longer than this agent's call timeout) returns the error and closes the disk again:
    `vdctl disk rm` works once the other agent has let go."""
    controller.stop()
    controller.start(["--lease", "3"])
    add_container(controller, "c1", tmp_path / "c1.img", "64M")
    vd(controller, "disk", "create", "d", "--size", "8M")
    a = agent(mount_factory, controller, "a", args=["--fault-timeout", "1"])
    b = agent(mount_factory, controller, "b")
    fd = open_direct(b.path / "d")
    dwrite(fd, 0, b"B" * BLOCK)
    os.kill(b.pid, signal.SIGSTOP)
    try:
        with pytest.raises(OSError) as ei:
            os.open(a.path / "d", os.O_WRONLY | os.O_TRUNC)
        assert ei.value.errno == errno.EIO
    finally:
        os.kill(b.pid, signal.SIGCONT)
    os.close(fd)

    def removed() -> bool:
        return controller.vdctl("disk", "rm", "d").rc == 0
    wait_for(removed, 20, "disk rm to succeed (a failed open must not keep the disk open)")
    assert "Traceback" not in a.log()


# ---------------------------------------------------------------- 6. a container in our mount


def test_container_inside_the_agents_own_mount_is_refused(controller, mount_factory,
                                                          tmp_path):
    """A container path that leads into the agent's own mount (here: a symlink swapped in
    after `container add`) would make the agent's I/O wait on itself. The agent refuses
    it with EIO, reports it, and keeps serving everything else."""
    add_container(controller, "c1", tmp_path / "c1.img", "256M")
    c2 = tmp_path / "c2.img"
    add_container(controller, "c2", c2, "16M")
    vd(controller, "disk", "create", "inner", "--size", "16M", "--container", "c1")
    vd(controller, "disk", "create", "d2", "--size", "8M", "--container", "c2")
    m = agent(mount_factory, controller)
    c2.unlink()
    c2.symlink_to(m.path / "inner")  # the container's path now leads into the mount
    p = subprocess.Popen(["dd", "if=/dev/zero", f"of={m.path / 'd2'}", "bs=4k", "count=1",
                          "conv=notrunc", "oflag=direct", "status=none"],
                         stderr=subprocess.PIPE, text=True)
    try:
        _, err = p.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        # the agent waits on itself: only its death (which aborts the FUSE connection)
        # releases the writer, whose request it had already taken
        m.kill9()
        p.communicate()
        pytest.fail("the agent wedged itself on a container inside its own mount")
    assert p.returncode != 0 and "Input/output error" in err, err
    with pytest.raises(OSError) as ei:  # again (the refusal is remembered for a while)
        read_direct(m.path / "d2", 0, BLOCK)
    assert ei.value.errno == errno.EIO
    assert os.path.ismount(m.path)
    assert read_direct(m.path / "inner", 0, BLOCK) == bytes(BLOCK)  # the mount still serves
    fd = open_direct(m.path / "inner")
    try:
        dwrite(fd, 0, b"i" * BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert "inside this agent's mount" in m.log()
    wait_for(lambda: "agent reports an I/O error on disk 'd2', container c2"
             in controller.log_path.read_text(errors="replace"), 10,
             "the controller to log the agent's report")
    assert "Traceback" not in m.log()
