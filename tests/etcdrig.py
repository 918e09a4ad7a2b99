"""Real etcd members for tests: ``EtcdProc`` runs one ``etcd`` process on free loopback
ports with its data in a directory of the test's, waits until it is healthy, and kills
it in teardown. Never the system's etcd service (scripts/sysdeps.sh disables it).

Tests import it as ``etcdrig`` (``tests/`` is on pytest's ``pythonpath``), the bench as
``tests.etcdrig``; it imports only the standard library.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

ETCD = shutil.which("etcd")
SKIP_REASON = "etcd is not installed (scripts/sysdeps.sh installs Debian's etcd-server)"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdProc:
    """One etcd member: alone in its cluster (``--initial-cluster NAME=PEER``), or one
    of several made by ``etcd_cluster``.

    The client and peer ports are picked once, so ``start()`` after ``kill()`` brings the
    same member back on its data dir (a restart, as after a crash). Short raft timers
    (heartbeat 50 ms, election 500 ms) make it ready in about a second; its minimum lease
    TTL is then under 1 s, so tests can use 2 s leases. Pre-vote is on, as docs/ha.md
    says to run etcd 3.4."""

    def __init__(self, data_dir: Path, log_path: Path, name: str = "n1", *,
                 tls: tuple[Path, Path, Path] | None = None,
                 client_cert: tuple[Path, Path] | None = None) -> None:
        """tls: (ca, cert, key): serve clients over https with cert, and require client
        certificates signed by ca (--client-cert-auth); peers stay on http.
        client_cert: (cert, key) the rig's own health checks present then."""
        if ETCD is None:
            raise RuntimeError(SKIP_REASON)
        self.tls = tls
        self.client_cert = client_cert
        self.data_dir = data_dir
        self.log_path = log_path
        self.name = name
        self.client_port = free_port()
        self.peer_port = free_port()
        self.cluster = f"{name}={self.peer_url}"  # --initial-cluster
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def url(self) -> str:
        """The client URL (the JSON gateway is served there too)."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        assert ETCD is not None
        return [ETCD, "--name", self.name, "--data-dir", str(self.data_dir),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", self.peer_url,
                "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", self.cluster, "--initial-cluster-state", "new",
                "--heartbeat-interval", "50", "--election-timeout", "500",
                # 3.4's default is off (3.5's on): without it a member cut off from the
                # others campaigns alone, and its higher raft term, once healed, deposes
                # the raft leader; the group's leader then can miss its 2 s keep-alive
                # (docs/ha.md, tests/multihost/test_group_netns.py)
                "--pre-vote",
                *([] if self.tls is None else [
                    "--trusted-ca-file", str(self.tls[0]), "--cert-file", str(self.tls[1]),
                    "--key-file", str(self.tls[2]), "--client-cert-auth"])]

    def spawn(self) -> None:
        """Start the process; wait_healthy() waits for it."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    def start(self, timeout: float = 20) -> EtcdProc:
        """Start the member and wait until it is healthy (wait_healthy)."""
        self.spawn()
        return self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 20) -> EtcdProc:
        """Wait until /health says true (the member is in a cluster with a leader);
        RuntimeError with the log's tail if it exits or is not healthy within timeout
        seconds (then it is killed)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}:\n{self.tail()}")
            if self.healthy():
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"etcd not healthy within {timeout:g} s:\n{self.tail()}")

    def healthy(self) -> bool:
        """/health says true (over TLS, presenting client_cert)."""
        ctx = None
        if self.tls is not None:
            ctx = ssl.create_default_context(cafile=str(self.tls[0]))
            if self.client_cert is not None:
                ctx.load_cert_chain(str(self.client_cert[0]), str(self.client_cert[1]))
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1, context=ctx) as r:
                return bool(json.loads(r.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    def signal(self, sig: int) -> None:
        """Send sig to the member (SIGSTOP/SIGCONT to freeze and thaw it)."""
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the member (a crash; its data dir stays) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a frozen member dies too
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; never raises."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        except OSError:
            pass


def etcd_cluster(base: Path, n: int = 3) -> list[EtcdProc]:
    """n members of one new cluster (e1..en), data and logs under base, all started and
    healthy; the caller stops each (``stop()``). Up in about 2 s."""
    base.mkdir(parents=True, exist_ok=True)
    members = [EtcdProc(base / f"e{i}", base / f"e{i}.log", f"e{i}") for i in range(1, n + 1)]
    cluster = ",".join(m.cluster for m in members)
    try:
        for m in members:
            m.cluster = cluster
            m.spawn()
        for m in members:
            m.wait_healthy()
    except BaseException:
        for m in members:
            m.stop()
        raise
    return members


class GroupMember:
    """One ``virtfs-controller --etcd`` member of a controller group (docs/ha.md), for
    tests and the bench: listening on unix:SOCK, its output in log_path.

    ``leads()`` reads the log after the member's last step-down (a kill counts as one,
    so a member restarted as a standby is not taken for the leader it was)."""

    def __init__(self, sock: Path, log_path: Path, name: str, state: Path, etcd: str,
                 extra: list[str] | None = None) -> None:
        self.name = name
        self.sock = sock
        self.addr = f"unix:{sock}"
        self.log_path = log_path
        self.cmd = [str(Path(sys.executable).parent / "virtfs-controller"), "--state-dir",
                    str(state), "--listen", self.addr, "--etcd", etcd, "--member-id", name,
                    *(extra or [])]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15) -> GroupMember:
        """Start it and wait until it listens; RuntimeError with the log if it exits."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} is not listening:\n{self.log()[-3000:]}")
            time.sleep(0.02)
        return self

    def leads(self) -> bool:
        alive = self.proc is not None and self.proc.poll() is None
        return alive and "leading group" in self.log().split("stepped down")[-1]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """kill -9 and reap it; the log marks it, as a step-down."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        with open(self.log_path, "ab") as log:
            log.write(b"--- killed (-9): stepped down ---\n")

    def stop(self) -> int | None:
        """SIGTERM (a clean stop resigns), SIGKILL after 20 s; its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        return rc


M = TypeVar("M", bound=GroupMember)


@contextmanager
def started_group(members: list[M], timeout: float = 15) -> Iterator[list[M]]:
    """Start members[0], wait until it leads, then the others (standbys); stop them all
    at the end of the block. RuntimeError if the first does not lead within timeout s."""
    try:
        members[0].start()
        deadline = time.monotonic() + timeout
        while not members[0].leads():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{members[0].name} does not lead:\n"
                                   f"{members[0].log()[-3000:]}")
            time.sleep(0.02)
        for m in members[1:]:
            m.start()
        yield members
    finally:
        for m in members:
            m.stop()

