"""A first write to a shared or moving segment is answered before anything is flushed
(docs/movement.md, "Durable at fsync"), on real mounts.

The controller copies the write's blocks and records their ``move.mark`` without
flushing either; the answer carries the mark's seq, and the agent's next fsync asks
the controller (``disk.sync``) to make it durable with its copies. The oracle: a writer
that fsyncs after each O_DIRECT write keeps a model of what each fsync made durable;
after a kill -9 and a restart every block must read as its last fsynced write or as
a write after it whose fsync did not return 0 (``_check``), and ``vdctl check`` is
clean. Fault points: ``movement.lazy_settle=hold:FILE`` parks the journal's flush of a
fault's copies (answered, not flushed), ``faults.synced=crash`` kills the controller
once a disk.sync made its record durable, before it answers.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from rig import (
    FAULTS_ENV,
    FIO_VERIFY,
    SEG,
    ControllerProc,
    FsyncWriter,
    add_container,
    agent,
    agent_killed_under_fio,
    check_clean,
    dwrite,
    hold_copier,
    open_direct,
    run,
    vd,
    wait_for,
)
from rig import read_direct as dread_path

B = 4096
SIZE = 16 << 20  # 4 segments


# the mode these tests are about (the default makes marks durable before the answer)
LAZY = ["--lease", "3", "--lazy-marks"]


def _controller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str) -> ControllerProc:
    monkeypatch.setenv(FAULTS_ENV, spec)
    c = ControllerProc(tmp_path / "state", tmp_path / "controller.log")
    c.start(LAZY)
    return c


def _restart(c: ControllerProc, monkeypatch: pytest.MonkeyPatch, *holds: Path) -> None:
    """kill -9 (if it still runs), disarm every fault point, start again."""
    if c.proc is not None:
        c.kill()
    for h in holds:
        h.unlink(missing_ok=True)
    monkeypatch.delenv(FAULTS_ENV, raising=False)
    c.start(LAZY)


def _background(steps: list[tuple[Callable[[], object], object]]
                ) -> tuple[threading.Thread, list[object]]:
    """Run each step's call in turn in a daemon thread, started now; the list gets each
    step's label once its call returned, or the errno of an OSError that ends the run."""
    res: list[object] = []

    def run() -> None:
        try:
            for fn, label in steps:
                fn()
                res.append(label)
        except OSError as e:
            res.append(e.errno)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, res


def _snapshotted_disk(c: ControllerProc, m_path: Path, tmp_path: Path) -> bytes:
    """Disk d, filled with random bytes (fsynced), and a snapshot d@s: every segment is
    shared, so each first write to one copies on write. The bytes."""
    add_container(c, "c1", tmp_path / "c1.img", "256M")
    vd(c, "disk", "create", "d", "--size", str(SIZE))
    base = os.urandom(SIZE)
    with open(m_path / "d", "r+b") as f:
        f.write(base)
        os.fsync(f.fileno())
    vd(c, "snap", "create", "d@s")
    return base


def test_fsync_after_a_restart_that_lost_the_mark_fails_eio(tmp_path, monkeypatch,
                                                              mount_factory):
    """Answered, not flushed (the copies' flush held), then kill -9: the restarted
    controller lacks the mark, so the fsync waiting for it fails with EIO, never 0; the
    write reads back as before it (allowed: never fsynced); fsynced writes before it
    stay; the copier then copies L1 over L2 and everything is clean."""
    hold, settle = tmp_path / "hold-copier", tmp_path / "hold-settle"
    hold.touch()
    c = _controller(tmp_path, monkeypatch,
                    f"{hold_copier(hold)},movement.lazy_settle=hold:{settle}@1+")
    try:
        m = agent(mount_factory, c)
        base = _snapshotted_disk(c, m.path, tmp_path)
        w = FsyncWriter(m.path / "d", [k * SEG // B + 3 for k in range(3)])
        fd = open_direct(m.path / "d")
        try:
            for k in range(2):  # first writes, fsynced: durable through disk.sync
                data = os.urandom(B)
                dwrite(fd, k * SEG + 3 * B, data)
                os.fsync(fd)
                w.durable[k * SEG // B + 3] = data
            settle.touch()
            data = os.urandom(B)
            dwrite(fd, 2 * SEG + 3 * B, data)  # answered: the mark is not durable
            w.maybe[2 * SEG // B + 3] = [data]
            t, res = _background([(lambda: os.fsync(fd), 0)])
            time.sleep(0.5)
            assert not res, "the fsync returned while the mark's flush was held"
            _restart(c, monkeypatch, hold, settle)
            t.join(20)
            assert res == [errno.EIO]
            with pytest.raises(OSError) as ei:  # and it stays failed at this agent
                os.fsync(fd)
            assert ei.value.errno == errno.EIO
        finally:
            os.close(fd)
        w.check(m.path / "d", base)
        assert dread_path(m.path / "d", 2 * SEG + 3 * B, B) == base[2 * SEG + 3 * B:][:B]
        wait_for(lambda: all(e["state"] == ["valid"] for e in vd(
            c, "disk", "map", "d", "--format", "json").json()["entries"]
            if e["vstart"] < 3 * SEG), 20, "the copies to finish")
        w.check(m.path / "d", base)
        check_clean(c)
    finally:
        c.stop()


def test_by_default_a_controller_crash_in_a_write_fault_fails_no_fsync(
        tmp_path, monkeypatch, mount_factory):
    """Without --lazy-marks a controller crash in the middle of a write fault is
    invisible to the writer: killed at the fault's copy (movement.copy=crash), the
    write is not answered; the agent faults again at the restarted controller, the
    write lands and its fsync returns 0 (with --lazy-marks the same crash after the
    answer fails the fsync: the test above); the data reads back, all is clean."""
    hold = tmp_path / "hold-copier"
    hold.touch()
    monkeypatch.setenv(FAULTS_ENV, f"{hold_copier(hold)},movement.copy=crash@1")
    c = ControllerProc(tmp_path / "state", tmp_path / "controller.log")
    c.start(["--lease", "3"])
    try:
        m = agent(mount_factory, c)
        base = _snapshotted_disk(c, m.path, tmp_path)
        fd = open_direct(m.path / "d")
        try:
            data = os.urandom(B)
            t, res = _background([(lambda: dwrite(fd, 2 * SEG + 3 * B, data), "written"),
                                  (lambda: os.fsync(fd), 0)])
            assert c.proc is not None
            c.proc.wait(20)  # the fault point's crash, in the write's fault
            assert not res, "the write was answered by a controller that crashed in it"
            c.kill()
            hold.unlink()
            monkeypatch.delenv(FAULTS_ENV)
            c.start(["--lease", "3"])
            t.join(30)
            assert res == ["written", 0], res
        finally:
            os.close(fd)
        assert dread_path(m.path / "d", 2 * SEG + 3 * B, B) == data
        assert dread_path(m.path / "d", 0, 2 * SEG) == base[:2 * SEG]
        check_clean(c)
    finally:
        c.stop()


def test_controller_crash_after_the_flush_before_the_fsync_returns(tmp_path, monkeypatch,
                                                                    mount_factory):
    """The mark made durable, then kill -9 before disk.sync answers: the agent asks the
    restarted controller, which finds the record of its previous start survived; the
    fsync returns 0 and the write stays."""
    c = _controller(tmp_path, monkeypatch, "faults.synced=crash@1")
    try:
        m = agent(mount_factory, c)
        base = _snapshotted_disk(c, m.path, tmp_path)
        fd = open_direct(m.path / "d")
        data = os.urandom(B)
        try:
            dwrite(fd, SEG + 5 * B, data)
            t, res = _background([(lambda: os.fsync(fd), 0)])
            assert c.proc is not None
            c.proc.wait(10)  # it crashed at faults.synced
            assert not res
            _restart(c, monkeypatch)
            t.join(20)
        finally:
            os.close(fd)
        assert res == [0]
        assert dread_path(m.path / "d", SEG + 5 * B, B) == data
        vd(c, "disk", "clone", "d@s", "old")
        wait_for(lambda: (m.path / "old").exists(), 10, "the clone")
        assert (m.path / "old").read_bytes() == base
        check_clean(c)
    finally:
        c.stop()


@pytest.mark.parametrize("trust_writes", [
    False, pytest.param(True, marks=pytest.mark.slow, id="oracle-fails")])
def test_controller_kill9_under_first_writes(tmp_path, monkeypatch, mount_factory,
                                             trust_writes):
    """kill -9 of the controller while a writer makes first writes (fsync after each)
    with their copies' flush held: after the restart no fsynced write is lost and no
    block reads older than its last fsynced write. With trust_writes (the fsync's wait
    skipped in the oracle: a write counts as durable once written) the same kill loses
    one, and the oracle says so."""
    hold, settle = tmp_path / "hold-copier", tmp_path / "hold-settle"
    hold.touch()
    c = _controller(tmp_path, monkeypatch,
                    f"{hold_copier(hold)},movement.lazy_settle=hold:{settle}@1+")
    try:
        m = agent(mount_factory, c)
        base = _snapshotted_disk(c, m.path, tmp_path)
        # many blocks, few written before the hold: the next write is most likely a
        # first write to its block (a fault, a lazy mark)
        blocks = [k * SEG // B + i for k in range(4) for i in range(0, SEG // B, 8)]
        w = FsyncWriter(m.path / "d", blocks, trust_writes)
        w.thread.start()
        wait_for(lambda: w.writes >= 10 or w.errors, 10, "fsynced writes")
        settle.touch()  # the next first write's mark is answered, never flushed
        time.sleep(0.5)
        _restart(c, monkeypatch, hold, settle)
        w.stop.set()
        w.thread.join(30)
        assert not w.thread.is_alive()
        if trust_writes:
            with pytest.raises(AssertionError, match="lost an fsynced write"):
                w.check(m.path / "d", base)
            return
        w.check(m.path / "d", base)
        check_clean(c)
    finally:
        c.stop()


def test_agent_kill9_after_first_writes_keeps_fsynced_writes(controller, mount_factory,
                                                              tmp_path):
    """kill -9 of the agent while fio makes first writes after a snapshot (fsync after
    each): the marks it was answered become durable at the controller anyway (or were
    never fsynced); fio's saved state verifies through a new agent."""
    m = agent(mount_factory, controller)
    _snapshotted_disk(controller, m.path, tmp_path)
    job = ["fio", "--name=crash", f"--filename={m.path / 'd'}", f"--size={SIZE}",
           *FIO_VERIFY, "--randseed=99", "--randrepeat=1", "--direct=1"]
    work = agent_killed_under_fio(m, job, tmp_path, 2.0)
    agent(mount_factory, controller, "again")
    again = tmp_path / "again" / "d"
    r = run([*[a.replace(str(m.path / "d"), str(again)) for a in job], "--verify_only",
             "--verify_state_load=1"], cwd=work, check=False)
    assert r.returncode == 0, f"fsynced writes lost:\n{r.stdout}\n{r.stderr}"
    check_clean(controller)
