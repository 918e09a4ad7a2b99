"""Each named fault point (controller/faultpoints.py), armed in a real process.

One scenario per point: a standalone controller (lease 2 s) and an agent, a thin disk
with 1 MiB segments on container c1, and the phases that pass the point: O_DIRECT
writes with an fsync after each (allocation, journal, container I/O), a snapshot, a
migration to c2, a migration aborted while its copier is held. The point is armed
through VIRTFS_FAULTS in the environment of the process it lives in. A watchdog
restarts the controller (unarmed) whenever it dies; an agent that dies is replaced.

After the fault: the point fired (its log line), the error reached whoever asked
(the writer's errno, vdctl's exit code, a failed job, or the controller's own
fail-stop), ``vdctl check`` finds no corruption (leaks may be reported), and after a
controller restart and a fresh agent every 4 KiB block reads back as the model
allows: what the last acknowledged (fsynced) write put there, or, for a write that
failed, its old or its new content.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
import time
from typing import Any

import pytest
import trio
from rig import (
    BIN,
    ControllerProc,
    add_container,
    agent,
    check_clean,
    dread,
    dwrite,
    hold_copier,
    open_direct,
    read_direct,
    vd,
    wait_for,
)

from controller import faultpoints
from controller.faultpoints import ENV, POINTS

B = 4096
SEG = 1 << 20
SIZE = 8 * SEG
LEASE = "2"

# (point, action, hit, phases, what must see an error: "writer", "vdctl", "job",
#  "controller" (it stops), "agent" (it dies) or None (a crash the system rides out))
CASES = [
    ("journal.before_fsync", "crash", 3, ["write"], None),
    ("journal.after_fsync", "crash", 3, ["write"], None),
    ("journal.after_fsync", "eio", 3, ["write"], "controller"),
    ("placement.plan", "eio", 2, ["write"], "writer"),  # (a pure step: an internal error)
    ("placement.zero", "enospc", 2, ["write"], "writer"),
    ("placement.zero", "eio", 2, ["write"], "writer"),
    ("placement.record", "crash", 2, ["write"], None),
    ("snapshot.create", "crash", 1, ["write", "snap"], None),
    ("snapshot.create", "eio", 1, ["write", "snap"], "vdctl"),
    ("movement.start", "crash", 1, ["write", "migrate"], None),
    ("movement.copy", "eio", 1, ["write", "migrate"], "job"),
    ("movement.settle", "crash", 1, ["write", "migrate"], None),
    ("movement.mark", "crash", 2, ["write", "migrate"], None),
    ("movement.commit", "crash", 1, ["write", "migrate"], None),
    ("movement.punch", "crash", 1, ["write", "migrate"], None),
    ("movement.abort", "crash", 1, ["write", "abort"], None),
    ("movement.copier", "eio", 1, ["write", "migrate"], "job"),
    ("blockio.write", "eio", 3, ["write"], "writer"),
    ("blockio.write", "enospc", 3, ["write"], "writer"),
    ("blockio.write", "crash", 3, ["write"], "agent"),
    ("blockio.sync", "eio", 2, ["write"], "writer"),
    ("blockio.sync", "crash", 2, ["write"], "agent"),
    ("fuse.handler", "raise:write", 3, ["write"], "writer"),  # a bug in a FUSE handler
]


# where an injected error is not one the code expects there, the controller logs it with
# its traceback (an internal error answered to the caller; the journal's fail-stop)
TRACEBACK_EXPECTED = {"journal.after_fsync=eio", "placement.plan=eio", "snapshot.create=eio",
                      "fuse.handler=raise:write"}


def _param(point: str, action: str, when: int, phases: list[str], sees: str | None) -> Any:
    marks = [pytest.mark.expect_log_errors("an injected error", match="fault point")
             ] if f"{point}={action}" in TRACEBACK_EXPECTED else []
    return pytest.param(point, action, when, phases, sees, marks=marks,
                        id=f"{point}={action}@{when}")


# points whose cases live in another module: relocation needs a snapshot family on a
# draining container (tests/mount/test_drain_snapshots.py kills the controller at each);
# the group journal's head move needs etcd (tests/etcd/test_termlog.py kills a writer
# between a batch's fdatasync and its head move); the worker threads' holds need a group
# whose leader is paused mid-copy or before a punch (tests/etcd/test_group_fence.py;
# tests/inproc/test_storage_gate.py holds a copy in-process); the copier's publish needs
# a segment larger than a batch (tests/mount/test_copier_push.py); a write fault's lazy
# mark needs a snapshot and a held flush or a crash after disk.sync's wait
# (tests/mount/test_fastwrite.py)
ELSEWHERE = {"relocate.copy", "relocate.record", "relocate.push", "relocate.punch",
             "movement.publish",
             "journal.before_head", "storage.copy_chunk", "storage.release",
             "movement.lazy_settle", "faults.synced",
             "snapshot.trim"}  # tests/mount/test_snap_rm_stall.py


def test_every_point_has_a_case():
    assert {c[0] for c in CASES} | ELSEWHERE == POINTS
    assert not {c[0] for c in CASES} & ELSEWHERE


def test_spec_syntax_and_hit_windows():
    assert faultpoints.parse(" journal.after_fsync=crash@3, movement.copy=eio@2+,"
                             "blockio.write=enospc@2-3,") == {
        "journal.after_fsync": ("crash", 3, 3), "movement.copy": ("eio", 2, float("inf")),
        "blockio.write": ("enospc", 2, 3)}
    assert faultpoints.parse("blockio.sync=eio") == {"blockio.sync": ("eio", 1, 1)}
    for bad in ("nope=eio", "blockio.sync", "blockio.sync=boom", "blockio.sync=eio@0",
                "blockio.sync=eio@x", "blockio.sync=eio@3-2"):
        with pytest.raises(ValueError, match=ENV):
            faultpoints.parse(bad)
    assert faultpoints.hit is faultpoints._off  # unarmed: nothing to do
    try:
        faultpoints.arm("movement.copy=eio@2-3,blockio.write=enospc@2+")
        fired = []
        for _ in range(5):
            for name in ("movement.copy", "blockio.write", "blockio.sync"):
                try:
                    faultpoints.hit(name)
                except OSError as e:
                    fired.append((name, e.errno))
        copy, write = ("movement.copy", errno.EIO), ("blockio.write", errno.ENOSPC)
        assert fired == [copy, write, copy, write, write, write]  # rounds 2, 2, 3, 3, 4, 5
        assert faultpoints.hits("blockio.write") == 5 and faultpoints.hits("blockio.sync") == 0
        with pytest.raises(ValueError):
            faultpoints.hit("no.such.point")
    finally:
        faultpoints.arm("")
    assert faultpoints.hit is faultpoints._off


async def test_raise_and_hold_actions(tmp_path):
    hold = tmp_path / "h@ld"
    assert faultpoints.parse(f"fuse.handler=raise:statfs@2+,movement.copier=hold:{hold}@1+,"
                             "blockio.write=raise") == {
        "fuse.handler": ("raise:statfs", 2, float("inf")),
        "movement.copier": (f"hold:{hold}", 1, float("inf")),
        "blockio.write": ("raise", 1, 1)}
    for bad in ("blockio.sync=hold:/x",  # hold only where a task or thread can wait
                "movement.copier=hold", "movement.copier=hold:",  # hold needs a file
                "blockio.sync=raise:x",  # blockio.sync's hits carry no key
                "fuse.handler=raise:", "blockio.sync=eio:x", "blockio.sync=crash:x"):
        with pytest.raises(ValueError, match=ENV):
            faultpoints.parse(bad)
    try:
        faultpoints.arm("fuse.handler=raise:statfs@2+")
        faultpoints.hit("fuse.handler", "statfs")  # hit 1: not in the window
        faultpoints.hit("fuse.handler", "read")  # another handler: not counted
        with pytest.raises(RuntimeError, match="fault point fuse.handler: statfs raises"):
            faultpoints.hit("fuse.handler", "statfs")
        assert faultpoints.hits("fuse.handler") == 2
        await faultpoints.hit_async("movement.copier")  # not armed: returns at once

        faultpoints.arm(f"movement.copier=hold:{hold}@1+")
        hold.touch()
        released = trio.Event()

        async def copier_step() -> None:
            await faultpoints.hit_async("movement.copier")
            released.set()

        async with trio.open_nursery() as n:
            n.start_soon(copier_step)
            await trio.sleep(0.3)
            assert not released.is_set()  # held while the file exists
            hold.unlink()
            with trio.fail_after(5):
                await released.wait()
        with trio.fail_after(1):
            await faultpoints.hit_async("movement.copier")  # no file: no wait
        assert faultpoints.hits("movement.copier") == 2
    finally:
        faultpoints.arm("")


class BlockModel:
    """What each 4 KiB block of a disk may read as: a set of acceptable contents.

    An acknowledged write makes its blocks exactly its data; a write that failed adds
    its data to what each block may hold (it may have landed, in whole or in part).
    """

    def __init__(self, size: int):
        self.opts: list[set[bytes]] = [{bytes(B)} for _ in range(size // B)]

    def write(self, off: int, data: bytes, ok: bool) -> None:
        for k in range(len(data) // B):
            blk = data[k * B : (k + 1) * B]
            b = off // B + k
            self.opts[b] = {blk} if ok else self.opts[b] | {blk}

    def copy(self) -> BlockModel:
        m = BlockModel(0)
        m.opts = [set(s) for s in self.opts]
        return m

    def check(self, image: bytes, what: str) -> None:
        assert len(image) == len(self.opts) * B, (what, len(image))
        bad = [b for b, s in enumerate(self.opts) if image[b * B : (b + 1) * B] not in s]
        assert not bad, f"{what}: blocks {bad[:8]} (of {len(bad)}) read back wrong"


class Watchdog:
    """Restarts the controller (unarmed) whenever it exits; remembers the exit codes."""

    def __init__(self, c: ControllerProc):
        self.c = c
        self.exits: list[int] = []
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self) -> None:
        while not self.stop.is_set():
            p = self.c.proc
            if p is not None and p.poll() is not None:
                self.exits.append(p.returncode)
                self.c.proc = None
                self.c.log.close()
                os.environ.pop(ENV, None)
                self.c.start(["--lease", LEASE])
            time.sleep(0.05)

    def close(self) -> None:
        self.stop.set()
        self.t.join()


def wait_jobs(c: ControllerProc, timeout: float = 40) -> list[dict[str, Any]]:
    """Wait until no job runs (restarts included); the job list."""
    def idle() -> bool:
        r = c.vdctl("job", "ls", "--format", "json")
        return r.rc == 0 and not any(j["state"] == "running" for j in r.json())
    wait_for(idle, timeout, "jobs to end")
    return vd(c, "job", "ls", "--format", "json").json()


@pytest.mark.parametrize("point,action,when,phases,sees", [_param(*c) for c in CASES])
def test_fault_point(controller, mount_factory, tmp_path, monkeypatch, point, action, when,
                     phases, sees):
    hold = tmp_path / "hold-copier"
    add_container(controller, "c1", tmp_path / "c1.img", "256M")
    add_container(controller, "c2", tmp_path / "c2.img", "256M")
    vd(controller, "disk", "create", "d", "--size", str(SIZE), "--segment-size", str(SEG),
       "--container", "c1")
    spec = f"{point}={action}@{when}"
    in_agent = point.startswith(("blockio.", "fuse."))
    controller.stop()
    # the controller's point, and for the abort phase its copier held while hold exists
    armed = ([] if in_agent else [spec]) + ([hold_copier(hold)] if "abort" in phases else [])
    if armed:
        os.environ[ENV] = ",".join(armed)
    try:
        controller.start(["--lease", LEASE], wait=False)
    finally:
        os.environ.pop(ENV, None)
    dog = Watchdog(controller)
    try:
        controller.wait_ready()
    except (RuntimeError, AssertionError):
        pass  # it died at start (the boot record): the watchdog brings it back
    wait_for(lambda: controller.sock.exists() and controller.vdctl("status").rc == 0, 20,
             "the controller")
    fault_env = {ENV: spec} if in_agent else {}
    m = agent(mount_factory, controller, env=fault_env, args=["--fault-timeout", "20"])
    model = BlockModel(SIZE)
    errnos: list[int] = []
    agent_deaths = 0
    vdctl_failed = False

    def replace_dead_agent(broken: bool = False) -> bool:
        """Replace the agent if it died (broken: the mount failed, so wait for its end)."""
        nonlocal m, agent_deaths
        if m.proc is None:
            return False
        if broken:
            try:
                m.proc.wait(10)
            except subprocess.TimeoutExpired:
                return False
        if m.proc.poll() is None:
            return False
        agent_deaths += 1
        m.close()
        m = agent(mount_factory, controller, args=["--fault-timeout", "20"])
        return True

    def write(off: int, data: bytes) -> None:
        try:
            fd = open_direct(m.path / "d")
        except OSError:
            assert replace_dead_agent(broken=True)
            fd = open_direct(m.path / "d")
        try:
            dwrite(fd, off, data)
            os.fsync(fd)
            model.write(off, data, ok=True)
        except OSError as e:
            errnos.append(e.errno or 0)
            model.write(off, data, ok=False)
            broken = e.errno in (errno.ECONNABORTED, errno.ENOTCONN)
        else:
            broken = False
        finally:
            try:
                os.close(fd)
            except OSError:
                pass
        replace_dead_agent(broken)

    try:
        if "write" in phases:
            for i in range(6):  # a new segment each: allocation, journal, container I/O
                write(i * SEG + (i % 3) * B, os.urandom(16 * B))
        if "snap" in phases:
            r = controller.vdctl("snap", "create", "d@s")
            vdctl_failed |= r.rc != 0
            wait_for(lambda: controller.vdctl("status").rc == 0, 20, "the controller")
            snaps = vd(controller, "snap", "ls", "d", "--format", "json").json()
            snap_model = model.copy() if snaps else None
            write(0, os.urandom(4 * B))  # copy on write, if the snapshot is there
            if snap_model is not None:
                wait_for(lambda: (m.path / "d@s").exists(), 10, "d@s in the mount")
                snap_model.check(read_direct(m.path / "d@s", 0, SIZE), "d@s")
        if "migrate" in phases:
            r = controller.vdctl("disk", "migrate", "d", "--to", "c2")
            vdctl_failed |= r.rc != 0
            wait_for(lambda: controller.vdctl("status").rc == 0, 20, "the controller")
            jobs = wait_jobs(controller)
            if sees == "job":
                assert [j["state"] for j in jobs] == ["failed"], jobs
            else:  # a crash at any step: the job resumes after the restart and finishes
                assert [j["state"] for j in jobs] == ["done"], jobs
            write(2 * SEG, os.urandom(4 * B))
        if "abort" in phases:
            hold.touch()
            jid = vd(controller, "disk", "migrate", "d", "--to", "c2", "--no-wait").out.strip()
            wait_for(lambda: any("nowrite" in e["state"] for e in vd(
                controller, "disk", "map", "d", "--format", "json").json()["entries"]),
                10, "moves to start")
            write(B, os.urandom(2 * B))  # a write fault copies and marks these blocks
            r = controller.vdctl("job", "abort", jid)
            vdctl_failed |= r.rc != 0
            hold.unlink()
            wait_jobs(controller)
            write(3 * SEG, os.urandom(4 * B))
        wait_for(lambda: controller.vdctl("status").rc == 0, 20, "the controller")
    finally:
        dog.close()
        if hold.exists():
            hold.unlink()

    # the fault fired, and someone was told
    log = (m.log_path if in_agent else controller.log_path).read_text(errors="replace")
    assert f"fault point {point}: {action}" in log, f"{spec} never fired"
    if action == "crash" and not in_agent:
        assert -9 in dog.exits, dog.exits
    if sees == "writer":
        want = errno.ENOSPC if action == "enospc" else errno.EIO
        assert want in errnos, errnos
    elif sees == "agent":
        assert agent_deaths == 1 and errnos, (agent_deaths, errnos)
    elif sees == "vdctl":
        assert vdctl_failed
    elif sees == "controller":
        assert dog.exits and dog.exits[0] != 0, dog.exits  # fail-stop, then restarted
    if sees != "agent":
        assert agent_deaths == 0
    if sees is None or sees in ("controller", "vdctl", "job"):
        assert not errnos, f"a writer saw {errnos} from a fault it should ride out"

    # nothing is corrupt; everything acknowledged is there after a restart and a remount
    controller.restart()
    chk = vd(controller, "check", "--format", "json").json()
    assert chk["errors"] == 0, chk
    m.close()
    m2 = agent(mount_factory, controller)
    model.check(read_direct(m2.path / "d", 0, SIZE), "d after the restarts")
    chk = vd(controller, "check", "--format", "json").json()
    assert chk["errors"] == 0, chk


# ---------------------------------------------------------------- real system calls fail


@pytest.mark.parametrize("syscall", ["pread64", "pwrite64"])
def test_one_transient_container_eio_in_the_agent(controller, mount_factory, tmp_path,
                                                  syscall):
    """One container read or write fails once (strace injects EIO on the 4th call): that
    one request gets EIO, the same request again succeeds, and everything else is as
    the model says, through a fresh agent too. (test_mount_faults has the permanent
    failures, test_agent_durability the failed fdatasync that must keep failing.)"""
    img = (tmp_path / "c1.img").resolve()
    add_container(controller, "c1", img, "64M")
    vd(controller, "disk", "create", "d", "--size", str(SIZE), "--segment-size", str(SEG))
    strace = ["strace", "-f", "-o", "/dev/null", "-P", str(img), "-e",
              "trace=pread64,pwrite64", "-e", f"inject={syscall}:error=EIO:when=4"]
    m = agent(mount_factory, controller, prefix=strace)
    model = BlockModel(SIZE)
    failed = []
    fd = open_direct(m.path / "d")
    try:
        for i in range(8):
            off, data = i * SEG + i * B, os.urandom(4 * B)
            for attempt in range(2):
                try:
                    dwrite(fd, off, data)
                    os.fsync(fd)
                    model.write(off, data, ok=True)
                    break
                except OSError as e:
                    assert e.errno == errno.EIO and attempt == 0, e
                    failed.append(("write", i))
                    model.write(off, data, ok=False)
        for i in range(8):
            for attempt in range(2):
                try:
                    got = dread(fd, i * SEG, SEG)
                    break
                except OSError as e:
                    assert e.errno == errno.EIO and attempt == 0, e
                    failed.append(("read", i))
            assert all(got[k * B : (k + 1) * B] in model.opts[i * SEG // B + k]
                       for k in range(SEG // B)), f"segment {i} reads back wrong"
    finally:
        os.close(fd)
    # which request meets the 4th call depends on the path that serves it (the C fast
    # path's first read of a disk goes through Python and builds its table): one does
    kind = "write" if syscall == "pwrite64" else "read"
    assert len(failed) == 1 and failed[0][0] == kind, failed
    assert "Input/output error" in m.log()
    m.close()
    model.check(read_direct(agent(mount_factory, controller, "fresh").path / "d", 0, SIZE),
                "d through a fresh agent")
    check_clean(controller)


def test_controller_copy_eio_fails_the_job_and_a_retry_finishes(controller, mount_factory,
                                                                tmp_path):
    """Every copy_file_range from container c1 fails in the controller (strace): the
    migration job fails with the error, the disk reads back intact meanwhile, and after
    a restart without the fault the moves finish and the disk is wholly on c2."""
    c1 = (tmp_path / "c1.img").resolve()
    add_container(controller, "c1", c1, "64M")
    add_container(controller, "c2", tmp_path / "c2.img", "64M")
    vd(controller, "disk", "create", "d", "--size", str(SIZE), "--segment-size", str(SEG),
       "--container", "c1")
    m = agent(mount_factory, controller)
    data = os.urandom(SIZE // 2)
    fd = open_direct(m.path / "d")
    try:
        dwrite(fd, 0, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    controller.stop()
    controller.log = open(controller.log_path, "ab")  # noqa: SIM115 - closed by stop()
    controller.proc = subprocess.Popen(
        ["strace", "-f", "-o", "/dev/null", "-P", str(c1), "-e", "trace=copy_file_range",
         "-e", "inject=copy_file_range:error=EIO:when=1+",
         str(BIN / "virtfs-controller"), "--state-dir", str(controller.state_dir),
         "--lease", LEASE], stdout=controller.log, stderr=subprocess.STDOUT)
    controller.wait_ready()
    traced = vd(controller, "status", "--format", "json").json()["pid"]
    r = controller.vdctl("disk", "migrate", "d", "--to", "c2")
    assert r.rc == 1, r.out + r.err
    jobs = wait_jobs(controller)
    assert jobs[-1]["state"] == "failed" and "Input/output error" in jobs[-1]["message"], jobs
    assert read_direct(m.path / "d", 0, SIZE) == data + bytes(SIZE // 2)
    chk = vd(controller, "check", "--format", "json").json()
    assert chk["errors"] == 0, chk
    os.kill(traced, signal.SIGTERM)  # the controller itself (strace would only detach)
    controller.proc.wait(20)
    controller.proc = None
    controller.log.close()
    controller.start(["--lease", LEASE])
    r = controller.vdctl("disk", "migrate", "d", "--to", "c2")
    assert r.rc == 0 or "already" in r.err, r.err
    wait_for(lambda: {e["container"] for e in vd(controller, "disk", "map", "d", "--format",
                                                   "json").json()["entries"]} == {"c2", None},
             30, "the moves to finish")
    assert read_direct(m.path / "d", 0, SIZE) == data + bytes(SIZE // 2)
    check_clean(controller)
