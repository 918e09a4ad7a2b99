"""A controller group across hosts (network namespaces, TESTING.md's recipe; issue 14).

Five "hosts" on one bridge: c1, c2, c3 each run an etcd member (one three-member
cluster, peer and client URLs on that host's address) and a ``virtfs-controller --etcd``
(its own member's URL first), listening on tcp:// with TLS 1.3, client certificates and
a token; a and b each run an agent (``virtfs-mount --controller`` with the three
addresses). etcd itself speaks plain http here: its TLS is tested in
tests/etcd/test_etcd_security.py. The state dir and the containers are files every host
sees under the same path, as a shared file system and a shared LUN would be.

Both agents write with ``fio --verify=crc32c --fsync=1``; the leader's link is cut (its
port on the bridge goes down: its etcd member and its controller are cut off together).
A standby takes over, the agents follow (fio sees no error, an allocating write issued
after the cut is served by the new leader), no fsynced write is lost (``--verify_only``),
``vdctl check`` is clean. Then the link is healed: the old leader rejoins as a standby,
and there is never a second leader.

Agents and controllers run under ``nsenter --net`` (network namespace only), so the FUSE
mounts are visible to the test; the only addresses used are inside the namespaces made
here. vdctl runs as a process in b's namespace, as an admin on another host would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from conftest import Pki
from etcdrig import ETCD, EtcdProc, GroupMember
from rig import BIN, PROC_LOGS, MountProc, wait_for

LEASE = 6.0  # the agents' lease; the leader's etcd lease is the default --etcd-ttl (2 s)
FAULT_TIMEOUT = 20.0
PORT = 7077
ETCD_CLIENT, ETCD_PEER = 2379, 2380
MIB = 1 << 20
SEG = 4 * MIB  # a thin disk's segment: a write to a new one allocates
BLOCK = 4096
FIO_REGION = 32 * MIB  # fio writes the first 32 MiB of d1 and d2 (64 MiB each)

# each host's address on the bridge (one /16); the controllers' are in the test PKI's
# server certificate (conftest.make_pki)
HOSTS = {"c1": "10.77.1.1", "c2": "10.77.2.1", "c3": "10.77.3.1",
         "a": "10.77.4.2", "b": "10.77.5.2"}
CONTROLLERS = ("c1", "c2", "c3")
ADDRS = ",".join(f"tcp://{HOSTS[c]}:{PORT}" for c in CONTROLLERS)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or ETCD is None
    or not all(shutil.which(t) for t in ("ip", "nsenter", "curl", "fio")),
    reason="needs root, etcd, ip, nsenter, curl and fio")


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


class Bridge:
    """A hub namespace with a bridge, and one namespace per host in HOSTS, each with a
    veth to the bridge (its end ``eth0``, the hub's ``p-NAME``). Nothing is made in the
    host's namespace; every namespace is deleted on exit, even after a failure."""

    def __init__(self) -> None:
        tag = f"vg{os.getpid() % 100000}"
        self.hub = f"{tag}h"
        self.ns = {h: f"{tag}{h}" for h in HOSTS}
        self.made: list[str] = []

    def __enter__(self) -> Bridge:
        try:
            self._add(self.hub)
            sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.hub, "link", "set", "br0", "up")
            for h, addr in HOSTS.items():
                ns = self._add(self.ns[h])
                sh("ip", "link", "add", f"p-{h}", "netns", self.hub, "type", "veth", "peer",
                   "name", "eth0", "netns", ns)
                sh("ip", "-n", self.hub, "link", "set", f"p-{h}", "master", "br0", "up")
                sh("ip", "-n", ns, "addr", "add", f"{addr}/16", "dev", "eth0")
                sh("ip", "-n", ns, "link", "set", "eth0", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _add(self, ns: str) -> str:
        sh("ip", "netns", "add", ns)
        self.made.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def __exit__(self, *exc: object) -> None:
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.made.clear()

    def link(self, host: str, up: bool) -> None:
        """Cut (up=False) or heal host's link: its port on the bridge goes down or up."""
        sh("ip", "-n", self.hub, "link", "set", f"p-{host}", "up" if up else "down")

    def prefix(self, host: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.ns[host]}"]


class NsEtcd(EtcdProc):
    """An etcd member of the three-member cluster, in host's namespace on its address."""

    def __init__(self, base: Path, host: str, net: Bridge) -> None:
        self.addr = HOSTS[host]
        self.prefix = net.prefix(host)
        super().__init__(base / f"e-{host}", base / f"e-{host}.log", f"e-{host}")
        self.client_port, self.peer_port = ETCD_CLIENT, ETCD_PEER
        self.cluster = ",".join(f"e-{c}=http://{HOSTS[c]}:{ETCD_PEER}" for c in CONTROLLERS)

    @property
    def peer_url(self) -> str:
        return f"http://{self.addr}:{self.peer_port}"

    @property
    def url(self) -> str:
        return f"http://{self.addr}:{self.client_port}"

    def command(self) -> list[str]:
        return [*self.prefix, *super().command()]

    def healthy(self) -> bool:
        """/health, asked from inside the member's namespace (curl)."""
        p = subprocess.run([*self.prefix, "curl", "-s", "-m", "1", self.url + "/health"],
                           capture_output=True, text=True, timeout=10)
        try:
            return p.returncode == 0 and json.loads(p.stdout).get("health") == "true"
        except ValueError:
            return False


class NsMember(GroupMember):
    """A virtfs-controller --etcd in host's namespace, on tcp:// with TLS and a token
    (advertised there), and on a unix socket the rig waits for."""

    def __init__(self, tmp: Path, host: str, state: Path, net: Bridge, pki: Pki) -> None:
        own = f"http://{HOSTS[host]}:{ETCD_CLIENT}"
        etcd = ",".join([own] + [f"http://{HOSTS[c]}:{ETCD_CLIENT}" for c in CONTROLLERS
                                 if c != host])
        tcp = f"tcp://{HOSTS[host]}:{PORT}"
        super().__init__(tmp / f"{host}.sock", tmp / f"{host}.log", host, state, etcd,
                         ["--listen", tcp, "--advertise", tcp, "--lease", str(LEASE),
                          *pki.server_args()])
        self.cmd = [*net.prefix(host), *self.cmd]
        PROC_LOGS.append(self.log_path)

    def steps_down(self) -> int:
        return self.log().count("stepped down")


def _stall_ms(out: str) -> float:
    """The longest write or fsync completion of a fio JSON report, ms."""
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return max(job["write"]["clat_ns"]["max"], job["sync"]["lat_ns"]["max"]) / 1e6


FIO = ["--name=v", "--ioengine=psync", "--rw=randwrite", "--bs=4k", "--direct=1",
       "--verify=crc32c", "--verify_fatal=1", "--randrepeat=1", "--fsync=1",
       "--fallocate=none", f"--size={FIO_REGION}", "--io_size=12M"]


class AllocatingWriter(threading.Thread):
    """Writes one block (and fsyncs it) at the start of a fresh segment of path (a thin
    disk nothing else writes), one segment after another, every `every` s until stopped
    or the disk ends; each write must allocate, so only a leader can serve it.

    The disk is opened at once (an open asks the controller), the writes start with
    start(). done: (issue time, seconds to fsynced, offset, data) of each; errors:
    failures."""

    def __init__(self, path: Path, every: float, size: int) -> None:
        super().__init__(daemon=True)
        self.every, self.size = every, size
        self.fd = os.open(path, os.O_RDWR)
        self.stop = threading.Event()
        self.done: list[tuple[float, float, int, bytes]] = []
        self.errors: list[str] = []

    def run(self) -> None:
        fd = self.fd
        try:
            off = 0
            while not self.stop.is_set() and off < self.size:
                data = os.urandom(BLOCK)
                t0 = time.monotonic()
                try:
                    os.pwrite(fd, data, off)
                    os.fsync(fd)
                except OSError as e:
                    self.errors.append(f"offset {off}: {e}")
                else:
                    self.done.append((t0, time.monotonic() - t0, off, data))
                off += SEG
                self.stop.wait(self.every)
        finally:
            os.close(fd)


@pytest.fixture
def net() -> Iterator[Bridge]:
    with Bridge() as b:
        yield b


def test_leader_cut_off_standby_takes_over_and_old_leader_rejoins(
        tmp_path: Path, pki: Pki, net: Bridge, mount_factory) -> None:
    with ExitStack() as stack:
        (tmp_path / "etcd").mkdir()
        etcds = [NsEtcd(tmp_path / "etcd", c, net) for c in CONTROLLERS]
        for e in etcds:
            stack.callback(e.kill)
            e.spawn()
        for e in etcds:
            e.wait_healthy()
        state = tmp_path / "state"
        state.mkdir(mode=0o700)
        c1, c2, c3 = members = [NsMember(tmp_path, c, state, net, pki) for c in CONTROLLERS]
        for m in members:
            stack.callback(m.stop)
        c1.start()
        wait_for(c1.leads, 20, "c1 to lead")
        c2.start()
        c3.start()

        def vdctl(*args: str, host: str = "b") -> subprocess.CompletedProcess[str]:
            return subprocess.run([*net.prefix(host), str(BIN / "vdctl"), "--controller",
                                   ADDRS, *pki.client_args(), "--format", "json", *args],
                                  capture_output=True, text=True, timeout=60)

        def vd(*args: str) -> object:
            p = vdctl(*args)
            assert p.returncode == 0, (args, p.stderr)
            return json.loads(p.stdout) if p.stdout.strip() else None

        def roster() -> dict[str, str]:
            g = vd("status")["group"]  # type: ignore[index]
            return {m["id"]: m["role"] for m in g["members"]}

        vd("container", "add", "ca", str(tmp_path / "ca.img"), "--size", "256M")
        vd("container", "add", "cb", str(tmp_path / "cb.img"), "--size", "256M")
        vd("disk", "create", "d1", "--size", "64M", "--container", "ca")
        vd("disk", "create", "d2", "--size", "64M", "--container", "cb")
        vd("disk", "create", "d3", "--size", "64M", "--container", "ca")
        opts = [*pki.client_args(), "--fault-timeout", str(FAULT_TIMEOUT)]
        ma: MountProc = mount_factory("ma", controller=ADDRS, args=opts,
                                      prefix=net.prefix("a"), state_dir=tmp_path / "sa")
        mb: MountProc = mount_factory("mb", controller=ADDRS, args=opts,
                                      prefix=net.prefix("b"), state_dir=tmp_path / "sb")
        wait_for(lambda: roster() == {"c1": "leader", "c2": "standby", "c3": "standby"},
                 20, "every member in the roster")

        work = tmp_path / "fio"
        work.mkdir()
        disks = ((ma, "d1", 11), (mb, "d2", 22))
        fios = [subprocess.Popen(["fio", f"--filename={m.path / d}", f"--randseed={seed}",
                                  *FIO, "--rate_iops=250", "--verify_backlog=64",
                                  "--output-format=json"], cwd=work, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for m, d, seed in disks]
        stack.callback(lambda: [f.kill() for f in fios if f.poll() is None])
        time.sleep(1.5)
        assert all(f.poll() is None for f in fios), "fio ended before the cut"
        steps = c1.steps_down()

        alloc = AllocatingWriter(ma.path / "d3", 0.5, 64 * MIB)
        cut = time.monotonic()
        net.link("c1", False)
        alloc.start()
        # a standby leads; the cut-off leader sees its term end (its etcd member has no
        # quorum) by itself; each timed from the cut
        seen: dict[str, float] = {}

        def progress() -> bool:
            if "takeover" not in seen and (c2.leads() or c3.leads()):
                seen["takeover"] = time.monotonic() - cut
            if "stepped" not in seen and c1.steps_down() > steps:
                seen["stepped"] = time.monotonic() - cut
            return len(seen) == 2

        wait_for(progress, 30, "a standby to lead and c1 to step down")
        takeover, stepped = seen["takeover"], seen["stepped"]
        new = c2 if c2.leads() else c3
        assert all(f.poll() is None for f in fios), "fio ended before the takeover"
        assert not c1.leads()

        outs = []
        for f in fios:
            out, err = f.communicate(timeout=180)
            assert f.returncode == 0, (err[-2000:], out[-2000:])
            outs.append(out)
        stalls = [_stall_ms(o) for o in outs]
        wait_for(lambda: len(alloc.done) + len(alloc.errors) >= 3, 60,
                 "allocating writes after the takeover")
        alloc.stop.set()
        alloc.join(FAULT_TIMEOUT + 10)
        assert not alloc.errors, alloc.errors
        first_alloc = alloc.done[0][0] + alloc.done[0][1] - cut
        # within the agents' lease: they reach the new leader before the lease they
        # had from the old one runs out, so writes to mapped blocks never wait for it
        assert max(stalls) < LEASE * 1000, stalls
        assert first_alloc < LEASE, first_alloc
        # the agents follow: the new leader names itself, through a surviving address
        st = vd("status")
        assert st["group"]["leader"] == new.name, st  # type: ignore[index]

        for (m, d, seed), _ in zip(disks, outs, strict=True):
            p = subprocess.run(["fio", f"--filename={m.path / d}", f"--randseed={seed}",
                                *FIO, "--verify_only"], cwd=work, capture_output=True,
                               text=True, timeout=300)
            assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        with open(mb.path / "d3", "rb") as f:  # read back through the other agent
            for _t, _lat, off, data in alloc.done:
                f.seek(off)
                assert f.read(BLOCK) == data, off
        p = vdctl("check")
        assert p.returncode == 0, p.stdout + p.stderr

        # heal: the old leader rejoins as a standby; never two leaders
        net.link("c1", True)
        healed = time.monotonic()
        wait_for(lambda: roster() == {"c1": "standby", new.name: "leader",
                                      ({"c2", "c3"} - {new.name}).pop(): "standby"},
                 30, "c1 back in the roster as a standby")
        rejoined = time.monotonic() - healed
        for _ in range(20):  # never two leaders, and no second failover
            assert [m.name for m in members if m.leads()] == [new.name]
            time.sleep(0.1)
        assert new.steps_down() == 0, new.log()[-3000:]
        assert "leading group" not in c1.log().split("stepped down")[-1]
        p = vdctl("check")
        assert p.returncode == 0, p.stdout + p.stderr
        assert ma.unmount() == 0 and mb.unmount() == 0
        print(f"takeover (cut to a standby leading): {takeover:.2f} s; c1 stepped down "
              f"after {stepped:.2f} s; first allocating write after the cut served after "
              f"{first_alloc:.2f} s, longest {max(x[1] for x in alloc.done):.2f} s "
              f"({len(alloc.done)} writes); longest fio write or fsync: agent a "
              f"{stalls[0]:.0f} ms, agent b {stalls[1]:.0f} ms; c1 a standby again "
              f"{rejoined:.2f} s after the heal")
