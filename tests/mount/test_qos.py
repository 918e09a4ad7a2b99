"""Per-disk QoS (docs/qos.md): fio measures the limit within 10% while an unlimited
disk beside it runs free, and the limit holds across an agent restart."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from rig import add_container, agent, vd

LIMIT_IOPS = 300
LIMIT_BPS = 4 << 20


def fio_job(path: Path, *args: str) -> subprocess.Popen[str]:
    """fio in the background (JSON on stdout): 4 jobs, 2 s ramp (the burst), then 4 s."""
    tmp = tempfile.mkdtemp()
    return subprocess.Popen(
        ["fio", "--name=q", f"--filename={path}", "--direct=1", "--ioengine=psync",
         "--numjobs=4", "--group_reporting", "--time_based", "--ramp_time=2", "--runtime=4",
         "--output-format=json", *args], cwd=tmp, stdout=subprocess.PIPE, text=True)


def result(p: subprocess.Popen[str], kind: str) -> tuple[float, float]:
    """(IOPS, bytes/s) of a finished fio_job for kind ("read" or "write")."""
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
    job = json.loads(out[out.index("{"):])["jobs"][0][kind]
    return job["iops"], job["bw_bytes"]


def test_limits_hold_and_leave_other_disks_alone(controller, mount_factory, tmp_path):
    add_container(controller, "c1", tmp_path / "c1.img", "1G")
    for name in ("a", "b"):
        vd(controller, "disk", "create", name, "--size", "64M")
    r = vd(controller, "disk", "set", "a", "--iops-limit", str(LIMIT_IOPS),
           "--write-bps-limit", str(LIMIT_BPS), "--format", "json").json()
    assert r["qos"] == {"iops": LIMIT_IOPS, "write_bps": LIMIT_BPS}
    assert f"iops {LIMIT_IOPS}/s, write-bps 4M/s" in vd(controller, "disk", "info", "a").out

    m = agent(mount_factory, controller)
    # 4 KiB random reads: a at its IOPS limit, b beside it unlimited
    pa = fio_job(m.path / "a", "--rw=randread", "--bs=4k")
    pb = fio_job(m.path / "b", "--rw=randread", "--bs=4k")
    (iops_a, _), (iops_b, _) = result(pa, "read"), result(pb, "read")
    assert abs(iops_a - LIMIT_IOPS) <= 0.1 * LIMIT_IOPS, iops_a
    assert iops_b > 3 * LIMIT_IOPS, iops_b

    # 64 KiB sequential writes: the write bytes/s limit binds before the IOPS one
    _, bw = result(fio_job(m.path / "a", "--rw=write", "--bs=64k", "--size=16M"), "write")
    assert abs(bw - LIMIT_BPS) <= 0.1 * LIMIT_BPS, bw

    # a new agent gets the limit with the disk's table
    m.close()
    m2 = agent(mount_factory, controller, name="m2")
    iops, _ = result(fio_job(m2.path / "a", "--rw=randread", "--bs=4k"), "read")
    assert abs(iops - LIMIT_IOPS) <= 0.1 * LIMIT_IOPS, iops

    # lifting it reaches the agent that has the disk open (a push)
    fd = open(m2.path / "a", "rb")  # noqa: SIM115 - keep it open across the change
    try:
        r = vd(controller, "disk", "set", "a", "--iops-limit", "none", "--write-bps-limit",
               "0", "--format", "json").json()
        assert r["qos"] == {}
        iops, _ = result(fio_job(m2.path / "a", "--rw=randread", "--bs=4k"), "read")
        assert iops > 3 * LIMIT_IOPS, iops
    finally:
        fd.close()


def test_bad_limits_are_refused(controller, tmp_path):
    add_container(controller, "c1", tmp_path / "c1.img", "64M")
    vd(controller, "disk", "create", "a", "--size", "8M")
    r = controller.vdctl("disk", "set", "a", "--iops-limit", "-5")
    assert r.rc == 2 and "invalid limit" in r.err, r.err
    r = controller.vdctl("disk", "set", "a")
    assert r.rc != 0 and "give at least one limit" in r.err, r.err
    r = controller.vdctl("disk", "set", "nope", "--iops-limit", "5")
    assert r.rc == 1 and "no such disk" in r.err, r.err
    # the limits survive a controller restart (journaled)
    vd(controller, "disk", "set", "a", "--read-bps-limit", "1M")
    controller.restart()
    assert vd(controller, "disk", "info", "a", "--format", "json").json()["qos"] == {
        "read_bps": 1 << 20}

