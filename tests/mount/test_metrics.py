"""Prometheus metrics (docs/metrics.md): both daemons scraped with a real HTTP client
while fio writes through a real mount; the figures move with fio's I/O."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rig import (
    BIN,
    ControllerProc,
    MountProc,
    add_container,
    agent,
    fio,
    metrics_port,
    run,
    sample,
    scrape,
    vd,
    wait_for,
)


@pytest.mark.parametrize("threads", ["0", "2"], ids=["python", "c-path"])
def test_metrics_move_with_fio(tmp_path, threads):
    """threads "2": the C fast path serves most reads and writes (virtfs/cfast.py), and
    its counts are folded into the same metrics."""
    c = ControllerProc(tmp_path / "state", tmp_path / "controller.log")
    c.start(["--metrics", "127.0.0.1:0"])
    try:
        run_with(c, tmp_path, {"VIRTFS_FAST_THREADS": threads})
    finally:
        c.stop()


def run_with(c: ControllerProc, tmp_path: Path, env: dict[str, str] | None = None) -> None:
    add_container(c, "c1", tmp_path / "c1.img", "256M")
    vd(c, "disk", "create", "d", "--size", "64M")
    cport = metrics_port(c.log_path, "virtfs-controller")
    m = MountProc(tmp_path / "m", c.state_dir, tmp_path / "m.log", controller=f"unix:{c.sock}",
                  args=["--metrics", "127.0.0.1:0"], env=env)
    m.start()
    try:
        aport = metrics_port(m.log_path, "virtfs-mount")
        a0, c0 = scrape(aport), scrape(cport)
        n = 2048  # 8 MiB of 4 KiB O_DIRECT writes, then fio's verify reads them back
        out = fio(m.path / "d", "--bs=4k", "--rw=randwrite", "--ioengine=psync",
                  "--direct=1", "--size=8M", f"--number_ios={n}", "--verify=crc32c",
                  "--verify_fatal=1", "--randrepeat=1", "--norandommap",
                  "--output-format=json").stdout
        job = json.loads(out[out.index("{"):])["jobs"][0]
        assert job["write"]["total_ios"] == n
        info = json.loads(vd(c, "disk", "info", "d", "--format", "json").out)
        # (gauges are rebuilt once a second)
        wait_for(lambda: sample(scrape(cport), "virtfs_disk_allocated_bytes", disk="d")
                 == info["allocated"], 5, "the gauges to catch up")
        a1, c1 = scrape(aport), scrape(cport)
        d = {"disk": "d", "op": "write"}
        assert sample(a1, "virtfs_agent_io_total", **d) - sample(a0, "virtfs_agent_io_total", **d) \
            == n
        assert sample(a1, "virtfs_agent_io_bytes_total", **d) == n * 4096
        assert sample(a1, "virtfs_agent_io_seconds_count", **d) == n
        r = {"disk": "d", "op": "read"}
        reads = job["read"]["total_ios"]  # fio's verify pass
        assert reads > 0
        assert sample(a1, "virtfs_agent_io_total", **r) - sample(a0, "virtfs_agent_io_total", **r) \
            == reads
        assert sample(a1, "virtfs_agent_faults_total", disk="d", reason="allocate") >= 1
        assert sample(a1, "virtfs_agent_fault_seconds_count", disk="d") >= 1
        assert sample(a1, "virtfs_agent_lease_valid") == 1
        assert sample(a1, "virtfs_agent_lease_remaining_seconds") > 0
        # the controller: the faults fio caused, the journal they went through, the pool
        ok = {"op": "disk.fault", "code": "ok"}
        assert sample(c1, "virtfs_controller_ops_total", **ok) > sample(
            c0, "virtfs_controller_ops_total", **ok)
        assert sample(c1, "virtfs_journal_commit_seconds_count") > sample(
            c0, "virtfs_journal_commit_seconds_count")
        assert sample(c1, "virtfs_disk_allocated_bytes", disk="d") == info["allocated"] > 0
        [c1info] = json.loads(vd(c, "container", "ls", "--format", "json").out)
        assert sample(c1, "virtfs_container_used_bytes", container="c1") == c1info["used"]
        assert sample(c1, "virtfs_container_size_bytes", container="c1") == 256 << 20
        leases = [v for (name, labels), v in c1.items()
                  if name == "virtfs_agent_lease_remaining_seconds"
                  and ("mount", str(m.path)) in labels]
        assert len(leases) == 1 and leases[0] > 0, leases
        assert sample(c1, "process_cpu_seconds_total") > 0
    finally:
        m.close()


def test_a_bad_metrics_address_is_a_usage_error(tmp_path):
    r = run([str(BIN / "virtfs-controller"), "--state-dir", str(tmp_path / "s"),
             "--metrics", "9100"], check=False)
    assert r.returncode == 2 and "expected HOST:PORT" in r.stderr, r.stderr
    assert not (tmp_path / "s").exists()


def test_agent_metrics_through_the_mount_factory(mount_factory, controller, tmp_path):
    """The agent's endpoint alone (no controller metrics), through the usual fixtures."""
    add_container(controller, "c1", tmp_path / "c1.img", "64M")
    vd(controller, "disk", "create", "d", "--size", "8M")
    m = agent(mount_factory, controller, args=["--metrics", "127.0.0.1:0"])
    port = metrics_port(m.log_path, "virtfs-mount")
    with open(m.path / "d", "r+b") as f:
        f.write(b"x" * 65536)
        f.flush()
        f.seek(0)
        assert f.read(5) == b"xxxxx"
    s = scrape(port)
    assert sample(s, "virtfs_agent_io_bytes_total", disk="d", op="write") >= 65536
    assert not any(k[0].startswith("virtfs_controller") for k in s)
