"""virtfs-controller --etcd: controllers as a group on a real etcd member (docs/ha.md).

Each member is a real virtfs-controller process with its own --listen socket, all on
one shared state dir; vdctl and agents are given every member's address.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from etcdrig import ETCD, SKIP_REASON, EtcdProc, GroupMember, started_group
from rig import BIN, PROC_LOGS, run_vdctl, wait_for

from controller.grouprecovery import Head, recover_files
from controller.label import HEARTBEAT_INTERVAL

pytestmark = pytest.mark.skipif(ETCD is None, reason=SKIP_REASON)

LEASE = 4.0  # the agents' lease; the leader's etcd lease is the default --etcd-ttl (2 s)


class Member(GroupMember):
    """A group member of these tests: its log checked for tracebacks (rig.PROC_LOGS)."""

    def __init__(self, tmp: Path, name: str, state: Path, etcd: EtcdProc | str) -> None:
        super().__init__(tmp / f"{name}.sock", tmp / f"{name}.log", name, state,
                         etcd if isinstance(etcd, str) else etcd.url,
                         ["--lease", str(LEASE)])
        PROC_LOGS.append(self.log_path)


@pytest.fixture
def group(tmp_path: Path, etcd: EtcdProc) -> Iterator[list[Member]]:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    with started_group([Member(tmp_path, f"c{i}", state, etcd) for i in (1, 2, 3)]) as g:
        yield g


def vd(addrs: str, *args: str) -> object:
    r = run_vdctl("--controller", addrs, "--format", "json", *args)
    assert r.rc == 0, r.err
    return json.loads(r.out) if r.out.strip() else None


def test_standbys_name_the_leader_and_a_killed_leader_is_replaced(group: list[Member],
                                                                   tmp_path: Path) -> None:
    c1, c2, c3 = group
    addrs = ",".join(m.addr for m in (c3, c2, c1))  # the leader last
    vd(addrs, "container", "add", "c1", str(tmp_path / "c1.img"), "--size", "64M")
    vd(addrs, "disk", "create", "x", "--size", "16M")
    r = run_vdctl("--controller", c2.addr, "status")  # one standby alone: it redirects
    assert r.rc == 0, r.err
    assert "closing connection: not the leader; the leader is " + c1.addr in c2.log()

    c1.kill()
    t0 = time.monotonic()
    wait_for(lambda: c2.leads() or c3.leads(), 15, "a standby to lead")
    took = time.monotonic() - t0
    assert took < 2 * LEASE, took  # the leader's etcd lease is LEASE / 2
    disks = vd(addrs, "disk", "ls")
    assert [d["name"] for d in disks] == ["x"]  # type: ignore[union-attr]
    new = c2 if c2.leads() else c3
    other = c3 if new is c2 else c2
    assert not other.leads()
    r = run_vdctl("--controller", other.addr, "disk", "ls")
    assert r.rc == 0, r.err
    # the group owns its containers: the new leader beats c1's heartbeat as its own
    # (one installation, one label), with no "contended" failure after a few beats
    time.sleep(3 * HEARTBEAT_INTERVAL)
    [c] = vd(addrs, "container", "ls")  # type: ignore[misc]
    assert (c["state"], c["label"]) == ("ok", "ok"), c


def test_standbys_are_hot(group: list[Member], tmp_path: Path) -> None:
    """Standbys apply the journal as the head moves: the roster shows them at the
    head's seq, and the one elected after a kill -9 takes over from its own state
    (no replay of the journal), with everything acknowledged there."""
    c1, c2, c3 = group
    addrs = ",".join(m.addr for m in group)
    vd(addrs, "container", "add", "c1", str(tmp_path / "c1.img"), "--size", "1G")
    for i in range(40):
        vd(addrs, "disk", "create", f"d{i}", "--size", "4M")

    def lagging() -> list[object]:
        st = vd(addrs, "status")
        head = st["group"]["head"]["seq"]  # type: ignore[index]
        return [m for m in st["group"]["members"]  # type: ignore[index]
                if m["role"] == "standby" and m["seq"] != head]

    wait_for(lambda: not lagging(), 10, "the standbys to reach the head")
    c1.kill()
    wait_for(lambda: c2.leads() or c3.leads(), 15, "a standby to lead")
    new = c2 if c2.leads() else c3
    wait_for(lambda: "hot standby: taking over at seq" in new.log(), 10, "the takeover")
    line = next(x for x in new.log().splitlines() if "hot standby: taking over" in x)
    # its own state was at the head already: nothing to replay at the takeover
    m = re.search(r"taking over at seq (\d+) \(it was at (\d+); (\d+) records applied", line)
    assert m and m[1] == m[2] and int(m[3]) >= 40, line
    assert len(vd(addrs, "disk", "ls")) == 40  # type: ignore[arg-type]
    assert run_vdctl("--controller", addrs, "check").rc == 0


def test_a_clean_stop_hands_over_at_once(group: list[Member], tmp_path: Path) -> None:
    c1, c2, c3 = group
    addrs = ",".join(m.addr for m in group)
    vd(addrs, "container", "add", "c1", str(tmp_path / "c1.img"), "--size", "64M")
    assert c1.stop() == 0
    t0 = time.monotonic()
    wait_for(lambda: c2.leads() or c3.leads(), 10, "a standby to lead")
    assert time.monotonic() - t0 < 1.5  # resigned: no lease to wait out
    assert [c["name"] for c in vd(addrs, "container", "ls")] == ["c1"]  # type: ignore
    assert os.path.exists(tmp_path / "c1.img")


def test_a_leader_paused_past_its_lease_steps_down_when_it_runs_again(
        group: list[Member], tmp_path: Path) -> None:
    """SIGSTOP the leader past its etcd lease: a standby takes over. SIGCONT: the old one
    answers nothing more, closes its connections, steps down and names the new leader."""
    c1, c2, c3 = group
    addrs = ",".join(m.addr for m in group)
    vd(addrs, "container", "add", "c1", str(tmp_path / "c1.img"), "--size", "64M")
    state = tmp_path / "state"
    c1.signal(signal.SIGSTOP)
    wait_for(lambda: c2.leads() or c3.leads(), 15, "a standby to lead")
    new = c2 if c2.leads() else c3
    vd(addrs, "disk", "create", "y", "--size", "16M")  # written in the new term
    old_files = {p.name: p.stat().st_size for p in state.glob("journal.*")}
    c1.signal(signal.SIGCONT)
    wait_for(lambda: "stepped down" in c1.log(), 10, "c1 to step down")
    assert not c1.leads()
    # split brain: the deposed leader wrote nothing after its term ended; the head is
    # the new term's, and recovery from it gives exactly the new leader's tables
    vd(addrs, "disk", "create", "z", "--size", "16M")
    now = {p.name: p.stat().st_size for p in state.glob("journal.*")}
    st = vd(addrs, "status")
    head = st["group"]["head"]  # type: ignore[index]
    c1_term = int(re.findall(r"leading group default \(term (\d+)\)", c1.log())[0])
    assert head["term"] != c1_term
    assert {k: v for k, v in now.items() if k.startswith(f"journal.{c1_term}.")} == {
        k: v for k, v in old_files.items() if k.startswith(f"journal.{c1_term}.")}
    rec = recover_files(str(state), Head(head["term"], head["seq"]))
    assert sorted(rec.state.disks) == ["y", "z"]
    r = run_vdctl("--controller", c1.addr, "disk", "ls", "--format", "json")
    assert r.rc == 0 and [d["name"] for d in json.loads(r.out)] == ["y", "z"], r.err
    assert f"not the leader; the leader is {new.addr}" in c1.log()


def test_status_shows_the_group_and_step_down_hands_over(group: list[Member]) -> None:
    c1, c2, c3 = group
    addrs = ",".join(m.addr for m in (c2, c3, c1))

    def members() -> dict[str, str]:
        g = vd(addrs, "status")["group"]  # type: ignore[index]
        return {m["id"]: m["role"] for m in g["members"]}

    wait_for(lambda: members() == {"c1": "leader", "c2": "standby", "c3": "standby"}, 10,
             "every member in the roster")
    st = vd(addrs, "status")
    assert st["group"]["leader"] == "c1" and st["group"]["name"] == "default"  # type: ignore
    assert st["group"]["head"]["seq"] == st["seq"]  # type: ignore[index]
    table = run_vdctl("--controller", addrs, "status").out
    assert "leader:         c1 (term " in table and "MEMBER" in table, table
    assert "journal head:   seq " in table, table

    r = run_vdctl("--controller", addrs, "group", "step-down", "--to", "c3")
    assert r.rc == 0 and "c1 steps down for c3" in r.err, r.err
    wait_for(c3.leads, 10, "c3 to lead")
    assert not c2.leads()
    wait_for(lambda: members() == {"c1": "standby", "c2": "standby", "c3": "leader"}, 10,
             "the roster to follow")
    r = run_vdctl("--controller", addrs, "group", "step-down", "--to", "nobody")
    assert r.rc == 1 and "no such standby member: 'nobody'" in r.err, r.err
    r = run_vdctl("--controller", addrs, "group", "step-down", "--to", "c3")
    assert r.rc == 1 and "'c3' leads already" in r.err, r.err
    r = run_vdctl("--controller", addrs, "group", "step-down")  # any standby
    assert r.rc == 0, r.err
    wait_for(lambda: c1.leads() or c2.leads(), 10, "another standby to lead")


def test_step_down_at_a_controller_that_runs_alone(controller) -> None:
    r = run_vdctl("--state-dir", str(controller.state_dir), "group", "step-down")
    assert r.rc == 1 and "runs alone (no --etcd)" in r.err, r.err


def test_group_options_are_checked(tmp_path: Path) -> None:
    base = [str(BIN / "virtfs-controller"), "--state-dir", str(tmp_path / "s")]
    for args, why in ((["--etcd", "http://127.0.0.1:1"], "--etcd needs --listen"),
                      (["--advertise", "unix:/x"], "need --etcd"),
                      (["--etcd", "ftp://x", "--listen", f"unix:{tmp_path}/a.sock"],
                       "etcd endpoint 'ftp://x'"),
                      (["--etcd", "http://127.0.0.1:1", "--listen", f"unix:{tmp_path}/a.sock",
                        "--etcd-ttl", "1"], "--etcd-ttl must be at least 2"),
                      (["--etcd-ttl", "5"], "need --etcd")):
        p = subprocess.run([*base, *args], capture_output=True, text=True, timeout=30)
        assert p.returncode == 2 and why in p.stderr.strip().splitlines()[-1], p.stderr


# ---------------------------------------------------------------- failover under load

FIO = ["--ioengine=psync", "--rw=randwrite", "--bs=4k", "--direct=1", "--verify=crc32c",
       "--verify_fatal=1", "--randrepeat=1", "--fsync=1", "--fallocate=none",
       "--output-format=json"]


def _fio(path: Path, seed: int, cwd: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["fio", "--name=v", f"--filename={path}", "--size=32M",
                             f"--randseed={seed}", *FIO, *extra], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stall_ms(out: str) -> float:
    """The longest write or fsync completion of a fio JSON report, ms."""
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return max(job["write"]["clat_ns"]["max"], job["sync"]["lat_ns"]["max"]) / 1e6


def failover_rounds(group: list[Member], mount_factory, tmp_path: Path, rounds: int,
                    seed: int) -> list[float]:
    """Two agents each write a disk with fio --verify --fsync=1 (one disk migrating
    between two containers) while the leader is killed (-9) at a random moment, then
    restarted as a standby; each round fio must see no error, --verify_only must pass,
    and vdctl check be clean. Returns each round's longest write stall (ms)."""
    import random
    rnd = random.Random(seed)
    addrs = ",".join(m.addr for m in group)
    vd(addrs, "container", "add", "a", str(tmp_path / "a.img"), "--size", "256M")
    vd(addrs, "container", "add", "b", str(tmp_path / "b.img"), "--size", "256M")
    vd(addrs, "disk", "create", "d1", "--size", "32M", "--thick", "--container", "a")
    vd(addrs, "disk", "create", "d2", "--size", "192M", "--thick", "--container", "a")
    m1 = mount_factory("m1", controller=addrs)
    m2 = mount_factory("m2", controller=addrs)
    work = tmp_path / "fio"
    work.mkdir()
    stalls: list[float] = []
    moving: list[bool] = []  # whether d2 was migrating when the leader was killed
    for i in range(rounds):
        to = "b" if i % 2 == 0 else "a"
        vd(addrs, "disk", "migrate", "d2", "--to", to, "--no-wait")
        jobs = [_fio(m1.path / "d1", 100 + i, work, "--io_size=8M", "--verify_backlog=64"),
                _fio(m2.path / "d2", 200 + i, work, "--io_size=8M", "--verify_backlog=64")]
        time.sleep(rnd.uniform(0.3, 1.5))  # fio (2,048 fsynced writes) lasts longer
        leader = next(m for m in group if m.leads())
        assert all(j.poll() is None for j in jobs), "fio ended before the kill"
        moving.append(any(j["state"] == "running" for j in vd(addrs, "job", "ls")))  # type: ignore
        leader.kill()
        others = [m for m in group if m is not leader]
        wait_for(lambda others=others: any(m.leads() for m in others), 15,
                 "a new leader")
        leader.start()  # back as a standby
        for j in jobs:
            out, err = j.communicate(timeout=120)
            assert j.returncode == 0, (i, err[-2000:], out[-2000:])
            stalls.append(_stall_ms(out))
        wait_for(lambda: all(j["state"] != "running" for j in vd(addrs, "job", "ls")),  # type: ignore
                 60, "the migration to end")
        r = run_vdctl("--controller", addrs, "check")
        assert r.rc == 0, (i, r.out, r.err)
    for k, (m, d) in enumerate(((m1, "d1"), (m2, "d2"))):
        v = subprocess.run(["fio", "--name=v", f"--filename={m.path / d}", "--size=32M",
                            f"--randseed={100 * (k + 1) + rounds - 1}", *FIO[:-1],
                            "--verify_only", "--io_size=8M"],
                           cwd=work, capture_output=True, text=True, timeout=300)
        assert v.returncode == 0, v.stderr[-2000:]
    print("migrating at the kill:", moving)
    return stalls


def test_failover_under_load(group: list[Member], mount_factory, tmp_path: Path) -> None:
    stalls = failover_rounds(group, mount_factory, tmp_path, rounds=2, seed=1)
    print("longest write stalls (ms):", stalls)
    assert max(stalls) < LEASE * 1000, stalls


@pytest.mark.slow
def test_failover_under_load_twenty_times(group: list[Member], mount_factory,
                                          tmp_path: Path) -> None:
    stalls = failover_rounds(group, mount_factory, tmp_path, rounds=20, seed=2)
    assert max(stalls) < LEASE * 1000, stalls


def test_quorum_lost_and_back(tmp_path: Path, etcd3: list[EtcdProc], mount_factory) -> None:
    """Three etcd members. One killed: the group goes on. Two: the leader's term ends
    and it says so in one line; agents keep writing mapped blocks within their lease.
    One back: a leader is elected by itself and serves everything written before."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    urls = ",".join(e.url for e in etcd3)
    members = [Member(tmp_path, f"c{i}", state, urls) for i in (1, 2)]
    try:
        members[0].start()
        wait_for(members[0].leads, 15, "c1 to lead")
        members[1].start()
        addrs = ",".join(m.addr for m in members)
        vd(addrs, "container", "add", "c1", str(tmp_path / "c1.img"), "--size", "64M")
        vd(addrs, "disk", "create", "x", "--size", "16M", "--thick")
        m = mount_factory("m", controller=addrs)
        x = m.path / "x"
        data = [os.urandom(4096) for _ in range(3)]

        def write(i: int) -> None:
            fd = os.open(x, os.O_WRONLY)
            try:
                os.pwrite(fd, data[i], i * 4096)
                os.fsync(fd)
            finally:
                os.close(fd)

        write(0)
        etcd3[2].kill()  # one of three: the group goes on
        vd(addrs, "disk", "create", "y", "--size", "4M")
        etcd3[1].kill()  # two of three: no quorum
        write(1)  # mapped blocks, within the agent's lease: no controller needed
        wait_for(lambda: "stepped down" in members[0].log(), 20, "the leader to step down")
        line = next(x for x in members[0].log().splitlines() if "stepped down" in x)
        assert "term" in line and "ended" in line, line
        assert not any(mm.leads() for mm in members)
        etcd3[1].start()  # quorum back: a leader by itself
        wait_for(lambda: any(mm.leads() for mm in members), 30, "a new leader")
        write(2)
        assert sorted(d["name"] for d in vd(addrs, "disk", "ls")) == ["x", "y"]  # type: ignore
        with open(x, "rb") as f:
            assert f.read(3 * 4096) == b"".join(data)
        assert run_vdctl("--controller", addrs, "check").rc == 0
    finally:
        for mm in members:
            mm.stop()
