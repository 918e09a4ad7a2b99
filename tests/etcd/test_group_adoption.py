"""From a standalone controller to a group on the same state dir, and back refused
(controller/adoption.py, docs/ha.md "From a standalone controller to a group"): real
controller processes, a real etcd member, real mounts."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from etcdrig import ETCD, SKIP_REASON, EtcdProc, GroupMember
from rig import PROC_LOGS, ControllerProc, run_vdctl, wait_for

from controller.grouprecovery import Head, recover_files

pytestmark = pytest.mark.skipif(ETCD is None, reason=SKIP_REASON)

MiB = 1 << 20


class Member(GroupMember):
    """A group member, its log checked for tracebacks."""

    def __init__(self, tmp: Path, name: str, state: Path, etcd: EtcdProc) -> None:
        super().__init__(tmp / f"{name}.sock", tmp / f"{name}.log", name, state, etcd.url,
                         ["--lease", "4"])
        PROC_LOGS.append(self.log_path)

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()


def vd(addrs: str, *args: str) -> object:
    r = run_vdctl("--controller", addrs, "--format", "json", *args)
    assert r.rc == 0, r.err
    return json.loads(r.out) if r.out.strip() else None


def write_sync(path: Path, off: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, off)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: Path, off: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def last_line(log: str) -> str:
    return log.strip().splitlines()[-1]


@pytest.mark.parametrize("stop", ["clean", "kill"])
def test_a_group_adopts_a_standalone_state_dir(tmp_path: Path, etcd: EtcdProc,
                                              mount_factory, stop: str) -> None:
    """A standalone controller makes disks and an agent writes them; a group member
    started while it runs is refused in one line; once it has stopped (cleanly: its
    checkpoint holds everything; or kill -9: records past it), the group's first leader
    adopts its journal: vdctl sees the disks, an agent reads the data back, and a
    later term (after a kill -9 of that leader) still does. A standalone controller on
    the group's state dir is then refused in one line."""
    state = tmp_path / "state"
    alone = ControllerProc(state, tmp_path / "alone.log")
    alone.start()
    members: list[Member] = []
    try:
        vd(alone.addr, "container", "add", "c1", str(tmp_path / "c1.img"), "--size", "64M")
        vd(alone.addr, "disk", "create", "x", "--size", "16M")
        vd(alone.addr, "disk", "create", "y", "--size", "8M", "--thick")
        m = mount_factory("m1", controller=alone.addr)
        data = {0: os.urandom(MiB), 5 * MiB: os.urandom(4096), 15 * MiB: os.urandom(8192)}
        for off, d in data.items():
            write_sync(m.path / "x", off, d)
        assert m.unmount() == 0

        # a group member while the standalone controller still runs: refused, nothing
        # adopted, the standalone unharmed
        early = Member(tmp_path, "early", state, etcd)
        members.append(early)
        early.start()
        wait_for(lambda: early.exited() is not None, 15, "the member to give up")
        assert early.exited() == 1
        line = last_line(early.log())
        assert "is in use by another controller (pid " in line, line
        assert not list(state.glob("checkpoint.*")), "adopted under a running standalone"
        assert [d["name"] for d in vd(alone.addr, "disk", "ls")] == ["x", "y"]  # type: ignore

        if stop == "clean":
            assert alone.stop() == 0
        else:
            alone.kill()

        g1, g2 = Member(tmp_path, "g1", state, etcd), Member(tmp_path, "g2", state, etcd)
        members += [g1, g2]
        g1.start()
        wait_for(g1.leads, 15, "g1 to lead")
        g2.start()
        assert "adopted a standalone controller's journal at seq" in g1.log()
        addrs = f"{g1.addr},{g2.addr}"
        assert [d["name"] for d in vd(addrs, "disk", "ls")] == ["x", "y"]  # type: ignore
        st = vd(addrs, "status")
        head = st["group"]["head"]  # type: ignore[index]
        assert head["seq"] == st["seq"]  # type: ignore[index]
        m2 = mount_factory("m2", controller=addrs)
        for off, d in data.items():
            assert read(m2.path / "x", off, len(d)) == d
        more = os.urandom(4096)
        write_sync(m2.path / "y", 4 * MiB, more)
        vd(addrs, "disk", "create", "z", "--size", "4M")

        # a later term chains from the adopted checkpoint
        g1.kill()
        wait_for(g2.leads, 15, "g2 to lead")
        assert sorted(d["name"] for d in vd(addrs, "disk", "ls")) == ["x", "y", "z"]  # type: ignore
        for off, d in data.items():
            assert read(m2.path / "x", off, len(d)) == d
        assert read(m2.path / "y", 4 * MiB, 4096) == more
        assert run_vdctl("--controller", addrs, "check").rc == 0
        head = vd(addrs, "status")["group"]["head"]  # type: ignore[index]
        rec = recover_files(str(state), Head(head["term"], head["seq"]))
        assert sorted(rec.state.disks) == ["x", "y", "z"]
        m2.close()
        for g in (g1, g2):
            g.stop()

        # the other way: a standalone controller on the group's state dir, refused
        back = subprocess.run([str(Path(g1.cmd[0])), "--state-dir", str(state)],
                              capture_output=True, text=True, timeout=30)
        assert back.returncode == 1, back.stderr
        line = last_line(back.stderr)
        assert "holds a controller group's journal (checkpoint." in line, line
        assert "--etcd" in line, line
    finally:
        for g in members:
            g.stop()
        alone.stop()
