"""Regression tests for the controller defects of issue 6 (each failed before its fix).

- a thin fault fdatasynced the whole container file (every agent's dirty data in it);
- one slow zeroing (a thick disk on a device) held every other fault in the pool;
- two writers growing a disk at once: the smaller grow got EINVAL;
- agents' opens were keyed by name: a rename racing a close leaked the open;
- a container path inside a virtfs mount hung the agent and its controller;
- version stamps came from the wall clock.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from controller import storage
from controller.client import open_controller
from controller.daemon import open_controller_service
from controller.protocol import E_BUSY, E_INVALID, RemoteError

SEG = 4 << 20
BIN = Path(sys.executable).parent


def _wait_socket(sock: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


def test_thin_faults_sync_only_the_new_range(tmp_path: Path) -> None:
    """strace the controller's syscalls on the container: no fdatasync/fsync, only the
    range-limited RWF_DSYNC writes (which the trace must see, or it proves nothing)."""
    state, img, trace = tmp_path / "s", tmp_path / "c1.img", tmp_path / "trace"
    state.mkdir()
    img.write_bytes(b"")
    os.truncate(img, 256 << 20)
    log = tmp_path / "controller.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["strace", "-f", "-o", str(trace), "-P", str(img),
             "-e", "trace=fdatasync,fsync,pwritev2,pwrite64",
             str(BIN / "virtfs-controller"), "--state-dir", str(state)],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_socket(state / "controller.sock", proc, log)
        addr = f"unix:{state}/controller.sock"

        async def faults() -> None:
            async with open_controller(addr) as adm, open_controller(addr, role="agent") as ag:
                await adm.call("container.add", name="c1", path=str(img), size=None)
                await adm.call("disk.create", name="x", size=64 << 20)
                await ag.call("agent.register", name="a", host="h", mount="/m")
                await ag.call("disk.open", name="x")
                for i in range(4):
                    r = await ag.call("disk.fault", name="x", offset=i * SEG, length=4096,
                                      write=True)
                    assert r["rows"][0][4] == 0, r  # a plain valid entry

        trio.run(faults)
    finally:
        # stop the controller itself (strace exits with it)
        kids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
        for pid in kids.stdout.split():
            os.kill(int(pid), 15)
        try:
            proc.wait(20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    calls = [ln for ln in trace.read_text().splitlines() if "(" in ln]
    syncs = [ln for ln in calls if "fdatasync(" in ln or "fsync(" in ln]
    dsync = [ln for ln in calls if "pwritev2(" in ln and "RWF_DSYNC" in ln]
    assert not syncs, syncs
    assert len(dsync) >= 4, calls


@pytest.fixture
def slow_thick_zeroing(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Zeroing for a thick disk (preallocate) blocks until the returned event is set."""
    release = threading.Event()
    orig = storage.zero_ranges

    def zero(path: str, ranges: list[tuple[int, int]], preallocate: bool = False) -> None:
        if preallocate:
            release.wait(30)
        orig(path, ranges, preallocate)

    monkeypatch.setattr(storage, "zero_ranges", zero)
    return release


async def test_slow_zeroing_holds_no_other_fault(tmp_path: Path,
                                                 slow_thick_zeroing: threading.Event) -> None:
    state = str(tmp_path / "s")
    addr = f"unix:{state}/controller.sock"
    async with open_controller_service(state) as svc:
        await svc.container_add("c1", str(tmp_path / "c1.img"), 1 << 30)
        await svc.disk_create("thin", 64 << 20, False, None, None)
        done: dict[str, Any] = {}

        async def thick() -> None:
            done["thick"] = await svc.disk_create("big", 256 << 20, True, None, None)

        async with trio.open_nursery() as n, open_controller(addr, role="agent") as ag:
            n.start_soon(thick)
            await trio.sleep(0.2)  # the thick create is zeroing now
            await ag.call("agent.register", name="a", host="h", mount="/m")
            await ag.call("disk.open", name="thin")
            with trio.move_on_after(10) as scope:
                r = await ag.call("disk.fault", name="thin", offset=0, length=4096,
                                  write=True)
            assert not scope.cancelled_caught, "a thin fault waited for a thick disk's zeroing"
            assert "thick" not in done
            slow_thick_zeroing.set()
        # both allocations are in the table, on separate space
        assert r["rows"][0][4] == 0
        assert svc.state.disks["big"].allocated == 256 << 20
        assert (await svc.check())["ok"]


async def test_concurrent_grows_both_succeed(tmp_path: Path) -> None:
    """Two writers growing one disk (or an append racing an ftruncate): the smaller grow
    arrives second and must succeed, leaving the larger size, as on a regular file."""
    state = str(tmp_path / "s")
    addr = f"unix:{state}/controller.sock"
    async with open_controller_service(state) as svc:
        await svc.container_add("c1", str(tmp_path / "c1.img"), 1 << 30)
        await svc.disk_create("x", 0, False, None, None)
        async with open_controller(addr, role="agent") as ag:
            await ag.call("agent.register", name="a", host="h", mount="/m")
            await ag.call("disk.open", name="x")
            big = await ag.call("disk.resize", name="x", size=3 * SEG, grow_only=True)
            small = await ag.call("disk.resize", name="x", size=8192, grow_only=True)
            assert big["size"] == small["size"] == 3 * SEG
            # the caller learns the real size, so it does not grow again and again
            assert small["update"]["size"] == 3 * SEG
            # an explicit resize (vdctl) still refuses to shrink without --allow-shrink
            with pytest.raises(RemoteError) as ei:
                await ag.call("disk.resize", name="x", size=8192)
            assert ei.value.code == E_INVALID


async def test_close_after_a_rename_is_counted_against_the_disk(tmp_path: Path) -> None:
    """An agent that closes a disk under the name it opened it by (the rename push not yet
    seen) must close that disk: opens are keyed by identity, not name."""
    state = str(tmp_path / "s")
    addr = f"unix:{state}/controller.sock"
    async with open_controller_service(state) as svc:
        await svc.container_add("c1", str(tmp_path / "c1.img"), 1 << 30)
        await svc.disk_create("x", SEG, False, None, None)
        await svc.disk_create("z", SEG, False, None, None)

        box: dict[str, Any] = {}

        async def ack(msg: dict[str, Any]) -> None:
            # acks the push but applies nothing: the agent's own idea of the name is stale
            box["nursery"].start_soon(lambda: box["ag"].call("agent.ack", pid=msg["pid"]))

        async with trio.open_nursery() as n, \
                open_controller(addr, role="agent", on_push=ack) as ag, \
                open_controller(addr) as adm:
            box["nursery"], box["ag"] = n, ag
            await ag.call("agent.register", name="a", host="h", mount="/m")
            t = await ag.call("disk.open", name="x")
            assert t["name"] == "x" and isinstance(t["handle"], int)
            await ag.call("disk.open", name="z")
            await adm.call("disk.rename", name="x", new="y")
            assert "y" in svc.state.disks
            hb = await ag.call("agent.heartbeat")
            assert set(hb["epochs"]) == {"y", "z"}
            with pytest.raises(RemoteError) as ei:
                await adm.call("disk.rm", name="y")
            assert ei.value.code == E_BUSY
            await ag.call("disk.close", name="x", handle=t["handle"])
            await adm.call("disk.rm", name="y")
            # z is still open: closing "x" did not touch it
            with pytest.raises(RemoteError):
                await adm.call("disk.rm", name="z")


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


async def test_version_stamps_grow_across_restarts_whatever_the_clock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Agents drop answers stamped lower than one they hold: a restarted controller must
    stamp higher than its previous incarnation ever did, even with the clock set back."""
    state = str(tmp_path / "s")
    async with open_controller_service(state) as svc:
        await svc.container_add("c1", str(tmp_path / "c1.img"), 1 << 30)
        await svc.disk_create("x", SEG, False, None, None)
        for _ in range(1000):
            svc._bump()
        before = svc.version
    monkeypatch.setattr(time, "time_ns", lambda: 0)  # the clock stepped back to 1970
    monkeypatch.setattr(time, "time", lambda: 0.0)
    async with open_controller_service(state) as svc:
        assert svc.version > before
        assert svc.state.boot == 2
