"""Drain and migrate move snapshots' and clones' storage too (issue 17 item 8): shared
storage is relocated whole (storage.relocate), on real mounts with the disk and a clone
open; qemu-img compare against copies taken before is the data oracle. Also kill -9 of
the controller at each relocation fault point, and the dry run's plan against what the
drain really moves."""

from __future__ import annotations

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
    add_container,
    agent,
    check_clean,
    dwrite,
    fio,
    open_direct,
    vd,
    wait_for,
)
from test_snapshots import compare, fill

B = 4096


def containers(c: ControllerProc) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in vd(c, "container", "ls", "--format", "json").json()}


def family(c: ControllerProc, m: Any, tmp: Path) -> tuple[dict[str, Path], int]:
    """On c1: disk d (16 MiB, written), d@s, more writes to d, clone k of d@s with writes
    of its own. Returns reference copies (read through the mount) of d, d@s and k, and
    c1's usage before anything was written (its label)."""
    add_container(c, "c1", tmp / "c1.img", "1G")
    add_container(c, "c2", tmp / "c2.img", "1G")
    empty = containers(c)["c1"]["used"]
    vd(c, "disk", "create", "d", "--size", "16M", "--container", "c1")
    fill(m.path / "d", os.urandom(16 << 20))
    vd(c, "snap", "create", "d@s")
    fd = open_direct(m.path / "d")
    try:  # copy-on-write in three segments (the rest stays shared with d@s)
        for k in (0, 2, 3):
            dwrite(fd, k * SEG + 7 * B, os.urandom(3 * B))
    finally:
        os.close(fd)
    vd(c, "disk", "clone", "d@s", "k")
    fd = open_direct(m.path / "k")
    try:
        dwrite(fd, SEG + 2 * B, os.urandom(B))
    finally:
        os.close(fd)
    refs = {}
    for name in ("d", "d@s", "k"):
        refs[name] = tmp / f"ref-{name}.raw"
        refs[name].write_bytes((m.path / name).read_bytes())
    assert refs["d"].read_bytes() != refs["d@s"].read_bytes() != refs["k"].read_bytes()
    return refs, empty


def on(c: ControllerProc, name: str) -> set[str]:
    """The containers table name (disk, clone or snapshot) maps storage on."""
    rows = vd(c, "disk", "map", name, "--format", "json").json()["entries"]
    return {r["container"] for r in rows if r["container"] is not None}


def state_files(c: ControllerProc) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in c.state_dir.iterdir() if p.is_file()}


def verify(c: ControllerProc, m: Any, refs: dict[str, Path], tmp: Path, empty: int) -> None:
    """c1 holds nothing a table maps, check is clean, every table reads as before."""
    assert containers(c)["c1"]["used"] == empty
    for name in ("d", "k", "d@s"):
        assert on(c, name) == {"c2"}, name
    check_clean(c)
    for name, ref in refs.items():
        now = tmp / f"now-{name}.raw"
        now.write_bytes((m.path / name).read_bytes())
        compare(now, ref)


def test_drain_moves_snapshot_and_clone_storage(controller, mount_factory, tmp_path):
    m = agent(mount_factory, controller)
    refs, empty = family(controller, m, tmp_path)
    r = controller.vdctl("container", "rm", "c1")
    assert r.rc == 1 and "snapshots: d@s" in r.err, r.err
    used = containers(controller)["c1"]["used"] - empty
    # the dry run: the plan, nothing journaled, no job
    files = state_files(controller)
    plan = vd(controller, "container", "drain", "c1", "-n", "--format", "json").json()
    assert plan["dry_run"] is True and plan["from"] == "c1" and plan["to"] is None
    assert state_files(controller) == files
    assert vd(controller, "job", "ls", "--format", "json").json() == []
    rows = {r["disk"]: r for r in plan["disks"]}
    assert rows["d"]["shared"] > 0 and rows["d"]["live"] == 3 * SEG  # its three CoW segments
    assert rows["k"]["live"] == SEG  # the clone's own segment
    # the plan's bytes are exactly what c1 holds for the tables, each block once
    assert plan["total"] == plan["live"] + plan["shared"] == used
    text = vd(controller, "container", "drain", "c1", "--dry-run").out
    assert "nothing was changed" in text and "snapshot and clone storage" in text
    # the real drain, with the disk and the clone open at the agent
    fds = [os.open(m.path / n, os.O_RDONLY) for n in ("d", "k", "d@s")]
    try:
        c2_before = containers(controller)["c2"]["used"]
        vd(controller, "container", "drain", "c1")
        job = vd(controller, "job", "ls", "--format", "json").json()[-1]
        assert job["state"] == "done", job
        # what moved is what the plan said: c2 got exactly plan["total"] bytes
        assert containers(controller)["c2"]["used"] - c2_before == plan["total"]
        verify(controller, m, refs, tmp_path, empty)
        # the open disk still works: write through it, read it back
        with open(m.path / "d", "r+b") as f:
            f.seek(5 * B)
            f.write(b"\x5a" * B)
            os.fsync(f.fileno())
        assert (m.path / "d").read_bytes()[5 * B:6 * B] == b"\x5a" * B
        assert (m.path / "d@s").read_bytes() == refs["d@s"].read_bytes()
    finally:
        for fd in fds:
            os.close(fd)
    # the oracle can fail: one byte off in the snapshot's copy, and compare says so
    bad = bytearray(refs["d@s"].read_bytes())
    bad[3 * SEG + 11] ^= 0xFF
    (tmp_path / "bad.raw").write_bytes(bad)
    with pytest.raises(AssertionError):
        compare(tmp_path / "bad.raw", refs["d@s"])
    assert containers(controller)["c1"]["state"] == "drained"
    vd(controller, "container", "rm", "c1")
    check_clean(controller)


def test_migrate_moves_its_snapshots_storage(controller, mount_factory, tmp_path):
    m = agent(mount_factory, controller)
    refs, empty = family(controller, m, tmp_path)
    plan = vd(controller, "disk", "migrate", "d", "--to", "c2", "-n", "--format",
              "json").json()
    rows = {r["disk"]: r for r in plan["disks"]}
    assert set(rows) == {"d"} and rows["d"]["live"] == 3 * SEG and plan["to"] == "c2"
    vd(controller, "disk", "migrate", "d", "--to", "c2")
    assert on(controller, "d") == on(controller, "d@s") == {"c2"}
    # the clone's own segment stays on c1 (migrate it to move it); what it shares moved
    assert on(controller, "k") == {"c1", "c2"}
    assert containers(controller)["c1"]["used"] == empty + SEG
    check_clean(controller)
    for name, ref in refs.items():
        now = tmp_path / f"now-{name}.raw"
        now.write_bytes((m.path / name).read_bytes())
        compare(now, ref)


@pytest.mark.parametrize("point", ["relocate.copy", "relocate.record", "relocate.push",
                                   "relocate.punch"])
def test_controller_kill9_at_each_relocation_step(point, controller, mount_factory,
                                                  tmp_path):
    m = agent(mount_factory, controller)
    refs, empty = family(controller, m, tmp_path)
    fd = os.open(m.path / "k", os.O_RDONLY)  # an agent has the clone open throughout
    try:
        controller.stop()
        controller.env = {**os.environ, FAULTS_ENV: f"{point}=crash@2"}
        controller.start(["--lease", "3"])
        vd(controller, "container", "drain", "c1", "--no-wait")
        assert controller.proc is not None
        wait_for(lambda: controller.proc.poll() is not None, 60,  # type: ignore[union-attr]
                 f"the controller to crash at {point}")
        controller.proc = None
        controller.log.close()
        assert f"fault point {point}: crash" in controller.log_path.read_text()
        controller.env = {k: v for k, v in os.environ.items() if k != FAULTS_ENV}
        time.sleep(0.5)
        controller.start(["--lease", "3"])
        wait_for(lambda: vd(controller, "job", "ls", "--format", "json").json()[-1]["state"]
                 != "running", 120, "the resumed drain")
        job = vd(controller, "job", "ls", "--format", "json").json()[-1]
        assert job["state"] == "done", job
        verify(controller, m, refs, tmp_path, empty)
    finally:
        os.close(fd)


def test_drain_while_fio_writes_the_disk(controller, mount_factory, tmp_path):
    """Copy-on-write faults on the disk race the relocation of what it shares with its
    snapshot: fio's verify passes, the snapshot reads as taken, the container ends empty."""
    add_container(controller, "c1", tmp_path / "c1.img", "1G")
    add_container(controller, "c2", tmp_path / "c2.img", "1G")
    empty = containers(controller)["c1"]["used"]
    vd(controller, "disk", "create", "d", "--size", "128M", "--container", "c1")
    m = agent(mount_factory, controller)
    fill(m.path / "d", os.urandom(128 << 20))
    vd(controller, "snap", "create", "d@s")
    ref = tmp_path / "ref-snap.raw"
    ref.write_bytes((m.path / "d@s").read_bytes())
    work = tmp_path / "fio"
    work.mkdir()
    args = [*FIO_VERIFY, "--randseed=21", "--direct=1", "--size=128M", "--io_size=48M"]
    p = subprocess.Popen(["fio", "--name=v", f"--filename={m.path / 'd'}", *args,
                          "--do_verify=1"], cwd=work, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(0.5)
        vd(controller, "container", "drain", "c1")
        assert p.poll() is None, "fio ended before the drain did: no race was tested"
        out = p.communicate(timeout=600)[0]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, out[-3000:]
    job = vd(controller, "job", "ls", "--format", "json").json()[-1]
    assert job["state"] == "done", job
    assert containers(controller)["c1"]["used"] == empty
    assert on(controller, "d") == on(controller, "d@s") == {"c2"}
    check_clean(controller)
    now = tmp_path / "now-snap.raw"
    now.write_bytes((m.path / "d@s").read_bytes())
    compare(now, ref)
    fio(m.path / "d", *args, "--verify_only")
