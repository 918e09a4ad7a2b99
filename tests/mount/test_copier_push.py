"""The background copier (issue 15), on real mounts: its marks reach agents as it goes
(published blocks need no write fault), its rate limit (journaled with the job), and
kill -9 of the controller around a batch's publish. A standalone controller, an agent
with its metrics served, fio; a disk of one 64 MiB segment, so one move spans several
of the copier's batches (a 4 MiB segment is one batch, committed at once)."""

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
    ControllerProc,
    add_container,
    agent,
    check_clean,
    fio,
    metrics_port,
    sample,
    scrape,
    vd,
    wait_for,
)

MiB = 1 << 20


def jobs(c: ControllerProc) -> list[dict[str, Any]]:
    return vd(c, "job", "ls", "--format", "json").json()


def on(c: ControllerProc, name: str) -> set[str | None]:
    rows = vd(c, "disk", "map", name, "--format", "json").json()["entries"]
    return {e["container"] for e in rows if e["container"] is not None}


def one_segment_disk(c: ControllerProc, mount_factory: Any, tmp_path: Path,
                     metrics: bool = False) -> Any:
    """c1 and c2; disk d (64 MiB, one 64 MiB segment) on c1, every block written."""
    add_container(c, "c1", tmp_path / "c1.img", "256M")
    add_container(c, "c2", tmp_path / "c2.img", "256M")
    vd(c, "disk", "create", "d", "--size", "64M", "--segment-size", "64M",
       "--container", "c1")
    m = agent(mount_factory, c, args=["--metrics", "127.0.0.1:0"] if metrics else None)
    with open(m.path / "d", "r+b") as f:
        f.write(os.urandom(64 * MiB))
        os.fsync(f.fileno())
    return m


def test_copier_publishes_as_it_goes_so_writes_to_copied_blocks_do_not_fault(
        controller, mount_factory, tmp_path):
    """fio 4 KiB random writes (each block once: fio's random map) while the disk's one
    segment moves at 24 MiB/s, counted over the middle of the move: without the
    copier's pushes nearly every write there faults (the whole segment is nowrite until
    the commit); with them only writes ahead of the copier do (about half)."""
    m = one_segment_disk(controller, mount_factory, tmp_path, metrics=True)
    port = metrics_port(m.log_path, "virtfs-mount")
    work = tmp_path / "fio"
    work.mkdir()
    p = subprocess.Popen(["fio", "--name=w", f"--filename={m.path / 'd'}", "--bs=4k",
                          "--rw=randwrite", "--ioengine=psync", "--direct=1", "--size=64M",
                          "--time_based", "--runtime=60"],
                         cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        assert p.poll() is None, "fio ended early"
        # 64 MiB at 24 MiB/s: 2.7 s; count in [0.9, 2.1] s of it, inside the move
        vd(controller, "disk", "migrate", "d", "--to", "c2", "--rate", "24M", "--no-wait")
        time.sleep(0.9)
        a0 = scrape(port)
        time.sleep(1.2)
        a1 = scrape(port)
        assert jobs(controller)[-1]["state"] == "running", "the move ended too soon"
        wait_for(lambda: jobs(controller)[-1]["state"] == "done", 30, "the migration")
    finally:
        p.kill()
        p.wait()
    writes = (sample(a1, "virtfs_agent_io_seconds_count", disk="d", op="write")
              - sample(a0, "virtfs_agent_io_seconds_count", disk="d", op="write"))
    faults = (sample(a1, "virtfs_agent_faults_total", disk="d", reason="nowrite")
              - sample(a0, "virtfs_agent_faults_total", disk="d", reason="nowrite"))
    print(f"{faults:.0f} of {writes:.0f} writes during the migration faulted")
    assert writes >= 40, f"only {writes} writes during the migration"
    assert faults < 0.85 * writes, f"{faults} of {writes} writes faulted"
    assert on(controller, "d") == {"c2"}
    check_clean(controller)


def test_migrate_rate_is_kept_and_survives_a_restart(controller, tmp_path):
    """--rate 32M: a 64 MiB migration takes about 2 s and job ls shows the limit; the
    way back at the same rate, with the controller killed mid-job, still has it."""
    add_container(controller, "c1", tmp_path / "c1.img", "256M")
    add_container(controller, "c2", tmp_path / "c2.img", "256M")
    vd(controller, "disk", "create", "d", "--size", "64M", "--thick", "--container", "c1")
    t0 = time.monotonic()
    r = vd(controller, "disk", "migrate", "d", "--to", "c2", "--rate", "32M")
    took = time.monotonic() - t0
    assert "done" in r.err and on(controller, "d") == {"c2"}
    assert took >= 1.5, f"64 MiB at 32 MiB/s took {took:.2f} s"
    assert jobs(controller)[-1]["rate_limit"] == 32 * MiB
    vd(controller, "disk", "migrate", "d", "--to", "c1", "--rate", "32M", "--no-wait")
    time.sleep(0.5)  # about 16 MiB copied
    controller.kill()
    controller.start()
    j = jobs(controller)[-1]
    assert j["state"] == "running" and j["rate_limit"] == 32 * MiB, j
    t1 = time.monotonic()
    wait_for(lambda: jobs(controller)[-1]["state"] == "done", 30, "the resumed job")
    took = time.monotonic() - t1
    assert took >= 1.0, f"the resumed job moved the rest (~48 MiB) in {took:.2f} s"
    assert on(controller, "d") == {"c1"}
    check_clean(controller)


def test_drain_rate_limits_the_relocation_of_shared_storage(controller, tmp_path):
    """container drain --rate 32M of a container holding a 64 MiB thick disk that its
    snapshot shares whole: the relocation of the shared storage (not the copier's
    moves) is paced too, so it takes about 2 s, and job ls shows the limit."""
    add_container(controller, "c1", tmp_path / "c1.img", "256M")
    add_container(controller, "c2", tmp_path / "c2.img", "256M")
    vd(controller, "disk", "create", "d", "--size", "64M", "--thick", "--container", "c1")
    vd(controller, "snap", "create", "d@s")
    t0 = time.monotonic()
    r = vd(controller, "container", "drain", "c1", "--to", "c2", "--rate", "32M")
    took = time.monotonic() - t0
    assert "done" in r.err and on(controller, "d") == {"c2"} and on(controller, "d@s") == {"c2"}
    assert took >= 1.5, f"64 MiB at 32 MiB/s took {took:.2f} s"
    assert jobs(controller)[-1]["rate_limit"] == 32 * MiB
    r = controller.vdctl("container", "drain", "c2", "--rate", "-1")
    assert r.rc != 0 and "rate" in r.err
    check_clean(controller)


@pytest.mark.parametrize("spec", ["movement.publish=crash@1", "movement.copier=crash@3"],
                         ids=["mark-then-crash-before-push", "push-then-crash-before-batch"])
def test_controller_crash_around_the_copiers_push(controller, mount_factory, tmp_path,
                                                  monkeypatch, spec):
    """kill -9 (a crash fault point) of the controller between a batch's mark and its
    push, and between the push and the next batch, while fio --verify writes: after
    the restart the job ends done, verify passes and vdctl check is clean."""
    controller.stop()
    controller.start(["--lease", "3"])
    m = one_segment_disk(controller, mount_factory, tmp_path)
    controller.stop()
    monkeypatch.setenv(FAULTS_ENV, spec)
    controller.start(["--lease", "3"])
    work = tmp_path / "fio"
    work.mkdir()
    p = subprocess.Popen(["fio", "--name=v", f"--filename={m.path / 'd'}", *FIO_VERIFY,
                          "--do_verify=1", "--randseed=13", "--direct=1", "--size=64M",
                          "--fsync=16"],
                         cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(0.5)
        assert p.poll() is None, "fio ended before the migration"
        vd(controller, "disk", "migrate", "d", "--to", "c2", "--rate", "32M", "--no-wait")
        assert controller.proc is not None
        controller.proc.wait(30)  # the fault point's crash
        assert f"fault point {spec.split('=')[0]}: crash" in controller.log_path.read_text()
        controller.kill()
        monkeypatch.delenv(FAULTS_ENV)
        controller.start(["--lease", "3"])
        out = p.communicate(timeout=300)[0]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, out[-3000:]
    wait_for(lambda: jobs(controller)[-1]["state"] == "done", 60, "the resumed job")
    assert on(controller, "d") == {"c2"}
    fio(m.path / "d", *FIO_VERIFY, "--randseed=13", "--direct=1", "--size=64M",
        "--verify_only")
    check_clean(controller)
