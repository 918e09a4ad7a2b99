"""Regression tests for defects found in review: each failed before its fix."""

from __future__ import annotations

import errno
import os
import signal
import subprocess

import pytest
import trio
from faultkit import BLOCK, add_container, agent, dread, dwrite, open_direct, read_direct, vd

from controller.client import open_controller


def test_shrink_then_grow_reads_zeros_past_the_old_end(embedded):
    p = embedded.path / "d"
    with open(p, "wb") as f:
        f.write(b"\xab" * 8192)
    os.truncate(p, 5000)
    os.truncate(p, 8192)
    data = read_direct(p, 0, 8192)
    assert data[:5000] == b"\xab" * 5000
    assert data[5000:] == bytes(8192 - 5000)


def test_rename_over_an_open_target_fails_and_keeps_both(embedded):
    a, b = embedded.path / "a", embedded.path / "b"
    a.write_bytes(b"A" * 4096)
    b.write_bytes(b"B" * 4096)
    with open(b, "rb"):
        with pytest.raises(OSError) as ei:
            os.rename(a, b)
        assert ei.value.errno == errno.EBUSY
        assert sorted(os.listdir(embedded.path)) == ["a", "b"]
    assert b.read_bytes() == b"B" * 4096
    # closed: rename(2) replaces the target atomically
    os.rename(a, b)
    assert os.listdir(embedded.path) == ["b"]
    assert b.read_bytes() == b"A" * 4096
    r = vd_json(embedded, "container", "ls")
    assert r[0]["used"] == 4096  # the replaced disk's block was freed


def vd_json(m, *args):
    from conftest import run_vdctl

    r = run_vdctl("--state-dir", str(m.state_dir), *args, "--format", "json")
    assert r.rc == 0, r.err
    return r.json()


def test_one_write_spanning_several_gaps_allocates_them_all(controller, mount_factory,
                                                            tmp_path):
    add_container(controller, "c1", tmp_path / "c1.img", "64M")
    vd(controller, "disk", "create", "d", "--size", "1M", "--segment-size", "4K")
    m = agent(mount_factory, controller)
    fd = open_direct(m.path / "d")
    try:
        dwrite(fd, BLOCK, b"1" * BLOCK)  # allocate block 1 only
        dwrite(fd, 0, b"x" * (3 * BLOCK))  # blocks 0 and 2 are two gaps of one fault
        assert dread(fd, 0, 3 * BLOCK) == b"x" * (3 * BLOCK)
    finally:
        os.close(fd)
    assert controller.vdctl("check").rc == 0


def test_reopen_sees_another_agents_overwrite(controller, mount_factory, tmp_path):
    add_container(controller, "c1", tmp_path / "c1.img", "64M")
    vd(controller, "disk", "create", "d", "--size", "8M")
    a = agent(mount_factory, controller, "a")
    b = agent(mount_factory, controller, "b")
    fd = open_direct(a.path / "d")
    try:
        dwrite(fd, 0, b"A" * BLOCK)
        os.fsync(fd)
        with open(b.path / "d", "rb") as f:  # buffered: fills b's page cache
            assert f.read(BLOCK) == b"A" * BLOCK
        dwrite(fd, 0, b"B" * BLOCK)  # an overwrite: no controller involved
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(b.path / "d", "rb") as f:  # a reopen drops b's cached pages
        assert f.read(BLOCK) == b"B" * BLOCK


async def test_concurrent_container_add_on_one_path(controller, tmp_path):
    path = str(tmp_path / "same.img")
    addr = "unix:" + str(controller.sock)
    results: list[str] = []

    async def add(name: str) -> None:
        async with open_controller(addr) as c:
            try:
                await c.call("container.add", name=name, path=path, size=1 << 20)
                results.append("ok")
            except Exception as e:
                results.append(type(e).__name__)

    async with trio.open_nursery() as n:
        for i in range(4):
            n.start_soon(add, f"c{i}")
    assert results.count("ok") == 1, results
    async with open_controller(addr) as c:
        assert len(await c.call("container.ls")) == 1
        assert (await c.call("check"))["ok"]
    # the losers never unlink the file the winner registered
    assert os.path.exists(path)  # noqa: ASYNC240 - a test, after the work is done


def test_paused_agent_is_dropped_and_reloads(controller, mount_factory, tmp_path):
    """An agent that sleeps through its lease must not come back with a stale table."""
    controller.stop()
    controller.start(["--lease", "2"])
    add_container(controller, "c1", tmp_path / "c1.img", "64K")
    vd(controller, "disk", "create", "d", "--size", "32K")
    m = agent(mount_factory, controller, args=["--fault-timeout", "20"])
    fd = open_direct(m.path / "d")
    try:
        dwrite(fd, 0, b"D" * (8 * BLOCK))
        os.kill(m.pid, signal.SIGSTOP)
        try:
            vd(controller, "disk", "resize", "d", "4K", "--allow-shrink")  # waits the lease
        finally:
            os.kill(m.pid, signal.SIGCONT)
        # the controller dropped the sleeper; its table is reloaded before any new write
        vd(controller, "disk", "create", "e", "--size", "28K", "--thick")
        with pytest.raises(OSError):
            dwrite(fd, 4 * BLOCK, b"X" * BLOCK)  # past the new end: refused, lands nowhere
        dwrite(fd, 0, b"Y" * BLOCK)
        assert dread(fd, 0, BLOCK) == b"Y" * BLOCK
        # the agent registered again and re-opened d with a fresh table
        ls = vd(controller, "agent", "ls", "--format", "json").json()
        assert [a["disks"] for a in ls] == [["d"]], ls
        assert os.fstat(fd).st_size == 4096
    finally:
        os.close(fd)
    e_data = subprocess.run(["dd", f"if={m.path / 'e'}", "bs=28K", "count=1", "iflag=direct",
                             "status=none"], capture_output=True, check=True).stdout
    assert e_data == bytes(28 << 10)  # nothing of d's ever landed in e
    assert controller.vdctl("check").rc == 0
