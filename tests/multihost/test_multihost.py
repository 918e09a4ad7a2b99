"""Three hosts on one machine (network namespaces, TESTING.md's recipe): the controller
in one, two agents in two others, over tcp:// with TLS 1.3 and a token; containers are
files every "host" sees under the same path (as a shared LUN would be).

Cut agent A's link while it writes; agent B and the controller carry on; once A's
lease is over the controller moves A's disk; restore the link; A reconnects and its
table is replaced. No fsynced write is lost, and no write A issued after it was fenced
lands anywhere (every write carries its issue time; both containers are scanned).

Agents run under ``nsenter --net`` (network namespace only), so their FUSE mounts are
visible to the test; the only addresses used are inside the namespaces made here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import Pki
from rig import BIN, ControllerProc, wait_for

LEASE = 3.0
FAULT_TIMEOUT = 4.0
PORT = 7077
BLOCK = 4096

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nsenter"),
    reason="needs root, ip and nsenter")


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


class Net:
    """Namespaces c (controller), a and b (agents); a<->c on 10.77.1.0/24, b<->c on
    10.77.2.0/24. The veths are created inside the namespaces (no name in the host's)."""

    def __init__(self) -> None:
        tag = f"vf{os.getpid() % 100000}"
        self.c, self.a, self.b = f"{tag}c", f"{tag}a", f"{tag}b"

    def __enter__(self) -> Net:
        for ns in (self.c, self.a, self.b):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for peer, net, dev in ((self.a, "10.77.1", "ca"), (self.b, "10.77.2", "cb")):
            sh("ip", "link", "add", dev, "netns", self.c, "type", "veth", "peer", "name",
               "up0", "netns", peer)
            sh("ip", "-n", self.c, "addr", "add", f"{net}.1/24", "dev", dev)
            sh("ip", "-n", peer, "addr", "add", f"{net}.2/24", "dev", "up0")
            sh("ip", "-n", self.c, "link", "set", dev, "up")
            sh("ip", "-n", peer, "link", "set", "up0", "up")
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in (self.c, self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def link_a(self, up: bool) -> None:
        sh("ip", "-n", self.c, "link", "set", "ca", "up" if up else "down")

    def prefix(self, ns: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{ns}"]


class Writer(threading.Thread):
    """Writes block after block of disk d through mount A, each followed by fsync.

    Block i holds its marker repeated: b"MHW-<i>-<issue time ns>-". fsynced: the
    blocks whose write and fsync both succeeded (with their content); errors: what
    the failures were."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path = path
        self.stop = threading.Event()
        self.fsynced: dict[int, bytes] = {}
        self.issued: dict[int, int] = {}
        self.errors: list[str] = []
        self.i = 0

    def run(self) -> None:
        fd = os.open(self.path, os.O_RDWR)
        try:
            while not self.stop.is_set():
                t = time.time_ns()
                marker = f"MHW-{self.i:08d}-{t:020d}-".encode()
                data = (marker * (BLOCK // len(marker) + 1))[:BLOCK]
                self.issued[self.i] = t
                try:
                    os.pwrite(fd, data, self.i * BLOCK)
                    os.fsync(fd)
                except OSError as e:
                    self.errors.append(f"block {self.i}: {e}")
                    time.sleep(0.2)
                else:
                    self.fsynced[self.i] = data
                self.i += 1
                time.sleep(0.002)
        finally:
            os.close(fd)


def scan(path: Path) -> list[tuple[int, int]]:
    """(block, issue time ns) of every writer marker in a container file."""
    found = set()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            for m in re.finditer(rb"MHW-(\d{8})-(\d{20})-", chunk):
                found.add((int(m.group(1)), int(m.group(2))))
    return sorted(found)


def agent(v, mount: Path) -> dict:
    rows = [r for r in v("agent", "ls", "--format", "json").json() if r["mount"] == str(mount)]
    return rows[0] if rows else {}


def test_partitioned_agent_is_fenced(tmp_path, pki: Pki, mount_factory):
    with Net() as net:
        state = tmp_path / "state"
        ctl = ControllerProc(state, tmp_path / "controller.log")
        ctl_log = open(tmp_path / "controller.log", "ab")  # noqa: SIM115
        ctl.log = ctl_log
        ctl.proc = subprocess.Popen(
            [*net.prefix(net.c), str(BIN / "virtfs-controller"), "--state-dir", str(state),
             "--listen", f"unix:{ctl.sock}", "--listen", f"tcp://0.0.0.0:{PORT}",
             "--lease", str(LEASE), *pki.server_args()],
            stdout=ctl_log, stderr=subprocess.STDOUT)
        try:
            ctl.wait_ready()
            v = ctl.vdctl
            for c in ("c1", "c2"):
                assert v("container", "add", c, str(tmp_path / f"{c}.img"), "--size",
                         "64M").rc == 0
            assert v("disk", "create", "d", "--size", "32M", "--container", "c1").rc == 0
            assert v("disk", "create", "e", "--size", "8M").rc == 0
            opts = [*pki.client_args(), "--fault-timeout", str(FAULT_TIMEOUT)]
            ma = mount_factory("ma", controller=f"tcp://10.77.1.1:{PORT}", args=opts,
                               prefix=net.prefix(net.a), state_dir=tmp_path / "sa")
            mb = mount_factory("mb", controller=f"tcp://10.77.2.1:{PORT}", args=opts,
                               prefix=net.prefix(net.b), state_dir=tmp_path / "sb")
            # vdctl over TCP from B's namespace, as an admin on another host would
            p = subprocess.run([*net.prefix(net.b), str(BIN / "vdctl"), "--controller",
                                f"tcp://10.77.2.1:{PORT}", *pki.client_args(), "status"],
                               capture_output=True, text=True, timeout=30)
            assert p.returncode == 0, p.stderr

            w = Writer(ma.path / "d")
            w.start()
            wait_for(lambda: len(w.fsynced) >= 300, 60, "A's first writes")
            cut = time.time_ns()
            net.link_a(False)

            # B carries on: writes, fsyncs and reads its own disk through the controller
            b_data = os.urandom(1 << 20)
            t0 = time.monotonic()
            with open(mb.path / "e", "r+b") as f:
                for k in range(8):
                    f.seek(k << 20)
                    f.write(b_data)
                    f.flush()
                    os.fsync(f.fileno())
            assert time.monotonic() - t0 < LEASE, "B waited for the cut-off agent"
            # the controller waits out A's lease, then changes the mapping of A's disk
            wait_for(lambda: not agent(v, ma.path).get("connected", False)
                     or agent(v, ma.path).get("lease_left", 1) <= 0, 30, "A's lease to end")
            r = v("disk", "migrate", "d", "--to", "c2")
            assert r.rc == 0, r.err
            fenced = cut + int(LEASE * 1e9)  # A's lease ran out no later than this
            m = v("disk", "map", "d", "--format", "json").json()["entries"]
            assert any(e["container"] == "c2" for e in m), m
            assert all(e["container"] in (None, "c2") for e in m), m

            # stop A's writer (its writes now wait for the controller and fail) and heal
            w.stop.set()
            w.join(FAULT_TIMEOUT * 3 + 10)
            assert not w.is_alive()
            assert w.errors, "A kept writing through the cut without an error"
            after_fence = [i for i in w.fsynced if w.issued[i] > fenced]
            assert not after_fence, f"A acknowledged writes issued after its fence: {after_fence}"
            after_cut = [i for i in w.fsynced if w.issued[i] > cut]
            net.link_a(True)
            wait_for(lambda: agent(v, ma.path).get("connected", False), 30,
                     "A to reconnect")

            # no fsynced write lost: B and A (with its replaced table) read them all
            for mnt in (mb.path, ma.path):
                with open(mnt / "d", "rb") as f:
                    for i, data in w.fsynced.items():
                        f.seek(i * BLOCK)
                        assert f.read(BLOCK) == data, (mnt, i)
            with open(mb.path / "e", "rb") as f:
                for k in range(8):
                    f.seek(k << 20)
                    assert f.read(1 << 20) == b_data
            # A's table is the new one: what B writes now (on c2) A reads, not c1's old data
            with open(mb.path / "d", "r+b") as f:
                f.seek(5 * BLOCK)
                f.write(b"B after the heal" * 256)
                f.flush()
                os.fsync(f.fileno())
            with open(ma.path / "d", "rb") as f:
                f.seek(5 * BLOCK)
                assert f.read(BLOCK) == b"B after the heal" * 256
            # A writes again, through the new mapping; B sees it
            with open(ma.path / "d", "r+b") as f:
                f.write(b"after the heal" * 100)
                f.flush()
                os.fsync(f.fileno())
            with open(mb.path / "d", "rb") as f:
                assert f.read(1400) == b"after the heal" * 100

            # no write A issued after its fence landed in any container
            late = [(i, t) for c in ("c1", "c2") for i, t in scan(tmp_path / f"{c}.img")
                    if t > fenced]
            assert not late, f"writes issued after the fence landed: {late[:5]}"
            assert v("check").rc == 0
            print(f"A: {len(w.fsynced)} blocks fsynced ({len(after_cut)} after the cut), "
                  f"{len(w.errors)} failed "
                  f"(first: {w.errors[:1]}), last issued {w.i}")
            assert ma.unmount() == 0 and mb.unmount() == 0
        finally:
            ctl.stop()
