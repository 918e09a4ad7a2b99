"""Online migration, drain, job abort and container fail/restore (issue 7), on real mounts.

A standalone controller and agents as subprocesses; fio --verify, cmp and a model
of the written bytes are the oracles. The fault point movement.copier=hold:FILE (while
FILE exists, the controller's copier copies nothing; rig.hold_copier) holds moves half
done, so writes and reads meet a bitmap with both marked and unmarked blocks.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path
from typing import Any

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
    disk_info,
    dwrite,
    hold_copier,
    open_direct,
    run,
    vd,
    wait_for,
)
from rig import read_direct as dread_path

B = 4096


def entries(c: ControllerProc, name: str) -> list[dict[str, Any]]:
    return vd(c, "disk", "map", name, "--format", "json").json()["entries"]


def containers(c: ControllerProc) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in vd(c, "container", "ls", "--format", "json").json()}


def jobs(c: ControllerProc) -> list[dict[str, Any]]:
    return vd(c, "job", "ls", "--format", "json").json()


def on(c: ControllerProc, name: str) -> set[str | None]:
    return {e["container"] for e in entries(c, name) if e["container"] is not None}


@pytest.fixture
def held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The copier copies nothing while this file exists. List it before `controller` in a
    test's arguments, so the controller starts with it in its environment."""
    hold = tmp_path / "hold-copier"
    hold.touch()
    monkeypatch.setenv(FAULTS_ENV, hold_copier(hold))
    return hold


def two_containers(c: ControllerProc, tmp_path: Path, size: str = "1G") -> None:
    add_container(c, "c1", tmp_path / "c1.img", size)
    add_container(c, "c2", tmp_path / "c2.img", size)


def fill(path: Path, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.write(data)
        os.fsync(f.fileno())


# ---------------------------------------------------------------- the acceptance runs


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered+2nd-agent"])
def test_migrate_under_fio_verify(controller, mount_factory, tmp_path, direct):
    """fio randwrite --verify runs while the disk moves to another container (and, in
    the buffered run, a second agent on another mountpoint writes the other half)."""
    two_containers(controller, tmp_path)
    vd(controller, "disk", "create", "d", "--size", "256M", "--container", "c1")
    m = agent(mount_factory, controller)
    fill(m.path / "d", os.urandom(256 << 20))  # every segment allocated on c1
    assert on(controller, "d") == {"c1"}
    half = ["--size=128M"]
    jobs_ = [(m, ["--offset=0", *half])]
    if not direct:
        m2 = agent(mount_factory, controller, "m2")
        jobs_.append((m2, ["--offset=128M", *half]))
    args = [*FIO_VERIFY, "--do_verify=1", "--randseed=7", *(["--direct=1"] if direct else [])]
    procs = []
    for i, (mm, extra) in enumerate(jobs_):
        work = tmp_path / f"fio{i}"
        work.mkdir()
        procs.append(subprocess.Popen(
            ["fio", "--name=v", f"--filename={mm.path / 'd'}", *args, *extra],
            cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        time.sleep(1.0)  # fio is writing
        assert all(p.poll() is None for p in procs), "fio ended before the migration"
        r = vd(controller, "disk", "migrate", "d", "--to", "c2")
        assert "done" in r.err
        assert all(p.poll() is None for p in procs), "the move did not overlap fio's writes"
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert on(controller, "d") == {"c2"}
    cs = containers(controller)
    assert cs["c1"]["used"] == 0 and cs["c2"]["used"] == 256 << 20
    check_clean(controller)
    assert jobs(controller)[-1]["state"] == "done"


def test_moving_segment_reads_each_block_from_its_side(held, controller, mount_factory,
                                                       tmp_path):
    """Blocks 1 and 3 and 100 bytes inside block 5 written while the segment moves (the
    copier held): a read of blocks 0-7 takes each block from where its data is."""
    two_containers(controller, tmp_path)
    vd(controller, "disk", "create", "d", "--size", "4M", "--container", "c1")
    m = agent(mount_factory, controller)
    model = bytearray(b"".join(bytes([i % 251]) * B for i in range(SEG // B)))
    fill(m.path / "d", bytes(model))
    job = vd(controller, "disk", "migrate", "d", "--to", "c2", "--no-wait").out.strip()
    wait_for(lambda: any(e["container"] == "c1" and "nowrite" in e["state"]
                         for e in entries(controller, "d")), 10, "the move to start")
    fd = open_direct(m.path / "d")
    try:
        for blk, byte in ((1, 0xA1), (3, 0xA3)):
            dwrite(fd, blk * B, bytes([byte]) * B)
            model[blk * B : (blk + 1) * B] = bytes([byte]) * B
    finally:
        os.close(fd)
    with open(m.path / "d", "r+b") as f:  # a sub-block write: the rest of block 5 stays
        f.seek(5 * B + 1000)
        f.write(b"\xc5" * 100)
        f.flush()
        os.fsync(f.fileno())
    model[5 * B + 1000 : 5 * B + 1100] = b"\xc5" * 100
    rows = entries(controller, "d")
    marked = {(e["vstart"], e["container"]) for e in rows if e["container"] == "c2"}
    assert {(1 * B, "c2"), (3 * B, "c2"), (5 * B, "c2")} <= marked, rows
    assert any(e["container"] == "c1" and e["state"] == ["nowrite"] for e in rows), rows
    assert dread_path(m.path / "d", 0, 8 * B) == bytes(model[: 8 * B])
    assert (m.path / "d").read_bytes() == bytes(model)
    # a second agent that opens it now reads the same, per block
    m2 = agent(mount_factory, controller, "m2")
    assert (m2.path / "d").read_bytes() == bytes(model)
    held.unlink()  # let the copier finish
    wait_for(lambda: jobs(controller)[-1]["state"] == "done", 30, f"job {job} to finish")
    assert on(controller, "d") == {"c2"}
    assert (m.path / "d").read_bytes() == bytes(model)
    assert dread_path(m2.path / "d", 0, SEG) == bytes(model)
    check_clean(controller)


def test_controller_kill9_mid_move_resumes(held, controller, mount_factory, tmp_path,
                                           monkeypatch):
    """kill -9 of the controller while moves are half done (and a writer writes, fsync
    after each): restarted, the job resumes from the persisted bitmaps and finishes; no
    fsynced write is lost (a write fault's mark is durable at the fsync, not at the
    answer: docs/movement.md, "Durable at fsync"; the writer's oracle, rig.FsyncWriter)."""
    controller.stop()
    controller.start(["--lease", "3"])
    two_containers(controller, tmp_path)
    vd(controller, "disk", "create", "d", "--size", "64M", "--container", "c1")
    m = agent(mount_factory, controller)
    base = os.urandom(64 << 20)
    fill(m.path / "d", base)
    vd(controller, "disk", "migrate", "d", "--to", "c2", "--no-wait")
    wait_for(lambda: any("nowrite" in e["state"] for e in entries(controller, "d")), 10,
             "moves to start")
    w = FsyncWriter(m.path / "d", list(range(0, (64 << 20) // B, 7)))
    w.thread.start()
    try:
        wait_for(lambda: w.writes >= 50 or w.errors, 20, "fsynced writes")
        assert not w.errors, w.errors
        controller.kill()
        held.unlink()
        monkeypatch.delenv(FAULTS_ENV)
        time.sleep(0.5)
        controller.start(["--lease", "3"])
        time.sleep(1.0)
    finally:
        w.stop.set()
        w.thread.join(60)
    assert not w.thread.is_alive()
    wait_for(lambda: jobs(controller)[-1]["state"] == "done", 60, "the resumed job")
    assert on(controller, "d") == {"c2"}
    assert containers(controller)["c1"]["used"] == 0
    w.check(m.path / "d", base)
    check_clean(controller)


def test_agent_kill9_mid_move_keeps_fsynced_writes(held, controller, mount_factory, tmp_path):
    two_containers(controller, tmp_path)
    vd(controller, "disk", "create", "d", "--size", "64M", "--container", "c1")
    m = agent(mount_factory, controller)
    fill(m.path / "d", os.urandom(64 << 20))
    vd(controller, "disk", "migrate", "d", "--to", "c2", "--no-wait")
    wait_for(lambda: any("nowrite" in e["state"] for e in entries(controller, "d")), 10,
             "moves to start")
    job = ["fio", "--name=crash", f"--filename={m.path / 'd'}", "--size=64M", *FIO_VERIFY,
           "--randseed=99", "--direct=1"]
    work = agent_killed_under_fio(m, job, tmp_path, 2.5)
    held.unlink()
    wait_for(lambda: jobs(controller)[-1]["state"] == "done", 60, "the job to finish")
    agent(mount_factory, controller, "again")
    again = tmp_path / "again" / "d"
    r = run([*[a.replace(str(m.path / "d"), str(again)) for a in job], "--verify_only",
             "--verify_state_load=1"], cwd=work, check=False)
    assert r.returncode == 0, f"fsynced writes lost:\n{r.stdout}\n{r.stderr}"
    assert on(controller, "d") == {"c2"}
    check_clean(controller)


def test_job_abort_rolls_back_and_leaks_nothing(held, controller, mount_factory, tmp_path):
    two_containers(controller, tmp_path)
    vd(controller, "disk", "create", "d", "--size", "32M", "--container", "c1")
    m = agent(mount_factory, controller)
    model = bytearray(os.urandom(32 << 20))
    fill(m.path / "d", bytes(model))
    jid = vd(controller, "disk", "migrate", "d", "--to", "c2", "--no-wait").out.strip()
    wait_for(lambda: any("nowrite" in e["state"] for e in entries(controller, "d")), 10,
             "moves to start")
    fd = open_direct(m.path / "d")
    try:  # writes into moving segments land at the new side
        for k in range(0, 8):
            off = k * SEG + 3 * B
            data = os.urandom(2 * B)
            dwrite(fd, off, data)
            model[off : off + 2 * B] = data
    finally:
        os.close(fd)
    assert (disk_info(controller, "d")["home"], disk_info(controller, "d")["container"]) == (
        "c2", "c2")  # new space goes to the target while the job runs
    r = vd(controller, "job", "abort", jid, "--format", "json").json()
    assert r["state"] == "aborted"
    assert (m.path / "d").read_bytes() == bytes(model)
    assert on(controller, "d") == {"c1"}  # the held moves all went back
    # and so did the disk's home and pin (journaled: a restart keeps them)
    for _ in range(2):
        info = disk_info(controller, "d")
        assert (info["home"], info["container"]) == ("c1", "c1")
        controller.restart()
    cs = containers(controller)
    assert cs["c2"]["used"] == 0 and cs["c1"]["used"] == 32 << 20
    check_clean(controller)
    # the job is listed as aborted; aborting it again is a clear error
    r2 = controller.vdctl("job", "abort", jid)
    assert r2.rc == 1 and "ended already" in r2.err


def test_drain_empties_a_container_then_rm(controller, mount_factory, tmp_path):
    two_containers(controller, tmp_path)
    vd(controller, "disk", "create", "a", "--size", "24M", "--container", "c1")
    vd(controller, "disk", "create", "b", "--size", "24M")  # home c1 (first added)
    m = agent(mount_factory, controller)
    data = {n: os.urandom(24 << 20) for n in "ab"}
    for n, d in data.items():
        fill(m.path / n, d)
    assert "c1" in on(controller, "b")
    vd(controller, "container", "drain", "c1")
    assert containers(controller)["c1"]["used"] == 0
    for n, d in data.items():
        assert (m.path / n).read_bytes() == d
        assert on(controller, n) == {"c2"}
    # drained, c1 stays out of placement (a restart too) until restore says otherwise
    for _ in range(2):
        assert containers(controller)["c1"]["state"] == "drained"
        controller.restart()
    vd(controller, "disk", "create", "e", "--size", "8M")
    fill(m.path / "e", os.urandom(8 << 20))
    assert on(controller, "e") == {"c2"} and containers(controller)["c1"]["used"] == 0
    r = controller.vdctl("disk", "migrate", "e", "--to", "c1")
    assert r.rc == 1 and "vdctl container restore c1" in r.err
    vd(controller, "container", "restore", "c1")
    assert containers(controller)["c1"]["state"] == "ok"
    # now it can go
    m.unmount()
    vd(controller, "container", "rm", "c1")
    check_clean(controller)


def test_container_fail_and_restore(controller, mount_factory, tmp_path):
    two_containers(controller, tmp_path)
    vd(controller, "disk", "create", "x", "--size", "8M", "--container", "c1")
    vd(controller, "disk", "create", "y", "--size", "8M", "--container", "c2")
    m = agent(mount_factory, controller)
    data = {n: os.urandom(8 << 20) for n in "xy"}
    for n, d in data.items():
        fill(m.path / n, d)
    fx = os.open(m.path / "x", os.O_RDWR | os.O_DIRECT)
    try:
        t0 = time.monotonic()
        vd(controller, "container", "fail", "c1")
        with pytest.raises(OSError) as ei:
            dread_path(m.path / "x", 0, B)
        assert ei.value.errno == errno.EIO
        with pytest.raises(OSError) as ei:
            dwrite(fx, SEG, bytes(B))
        assert ei.value.errno == errno.EIO
        assert time.monotonic() - t0 < 1.0
        assert (m.path / "y").read_bytes() == data["y"]  # other disks work
        assert containers(controller)["c1"]["state"] == "error"
        vd(controller, "container", "restore", "c1")
        assert (m.path / "x").read_bytes() == data["x"]
        dwrite(fx, SEG, bytes(B))
    finally:
        os.close(fx)
    assert containers(controller)["c1"]["state"] == "ok"
    check_clean(controller)


def test_io_errors_make_a_container_suspect(controller, mount_factory, tmp_path):
    two_containers(controller, tmp_path)
    vd(controller, "disk", "create", "x", "--size", "8M", "--container", "c1")
    m = agent(mount_factory, controller)
    fill(m.path / "x", os.urandom(8 << 20))
    m.unmount()
    img = str(tmp_path / "c1.img")
    bad = agent(mount_factory, controller, "bad", prefix=[
        "strace", "-f", "-o", "/dev/null", "-P", img, "-e", "trace=pread64",
        "-e", "inject=pread64:error=EIO:when=1+"])
    with pytest.raises(OSError) as ei:
        dread_path(bad.path / "x", 0, B)
    assert ei.value.errno == errno.EIO
    wait_for(lambda: containers(controller)["c1"]["state"] == "suspect", 10, "suspect")
    c1 = containers(controller)["c1"]
    assert c1["errors"] >= 1 and "x" in c1["last_error"]
    assert "suspect" in vd(controller, "container", "ls").out
    vd(controller, "container", "restore", "c1")
    assert containers(controller)["c1"]["state"] == "ok"


def test_movement_bad_input(controller, mount_factory, tmp_path):
    add_container(controller, "only", tmp_path / "only.img", "64M")
    r = controller.vdctl("container", "drain", "only")
    assert r.rc == 1 and "only usable container" in r.err
    add_container(controller, "c2", tmp_path / "c2.img", "8M")
    add_container(controller, "c3", tmp_path / "c3.img", "64M")
    vd(controller, "disk", "create", "d", "--size", "16M", "--container", "only")
    m = agent(mount_factory, controller)
    fill(m.path / "d", os.urandom(16 << 20))
    before = entries(controller, "d")
    vd(controller, "container", "fail", "c3")
    for args, msg in [
        (["disk", "migrate", "d", "--to", "only"], "wholly on container"),
        (["disk", "migrate", "d", "--to", "nope"], "no such container"),
        (["disk", "migrate", "d", "--to", "c3"], "is failed"),
        (["disk", "migrate", "d", "--to", "c2"], "free; disk"),
        (["disk", "migrate", "nope", "--to", "c2"], "no such disk"),
        (["job", "abort", "99"], "no such job"),
        (["container", "drain", "only", "--to", "only"], "into itself"),
        (["container", "drain", "only", "--to", "c2"], "free elsewhere"),
    ]:
        r = controller.vdctl(*args)
        assert r.rc == 1 and msg in r.err, (args, r.err)
        assert len(r.err.strip().splitlines()) == 1, r.err
    r = controller.vdctl("disk", "migrate", "d")
    assert r.rc == 2  # --to is required: a usage error
    assert entries(controller, "d") == before and jobs(controller) == []
    check_clean(controller)


def test_thick_disk_moves_a_segment_at_a_time_and_merges_again(controller, tmp_path):
    """A thick disk is a few large extents: they move segment by segment (no agent needed)
    and merge again on the target; a second migration back works too."""
    two_containers(controller, tmp_path)
    vd(controller, "disk", "create", "t", "--size", "96M", "--thick", "--container", "c1")
    assert disk_info(controller, "t")["extents"] == 1
    vd(controller, "disk", "migrate", "t", "--to", "c2")
    info = disk_info(controller, "t")
    assert on(controller, "t") == {"c2"} and info["extents"] == 1
    assert info["container"] == "c2"  # a pinned disk is pinned to its new home
    vd(controller, "disk", "migrate", "t", "--to", "c1")
    assert on(controller, "t") == {"c1"} and containers(controller)["c2"]["used"] == 0
    check_clean(controller)
