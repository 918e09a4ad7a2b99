"""Shared fixtures over the rig (rig.py): a real controller process on a real socket in
tmp_path, agents on real mounts, a test PKI; and the check that fails a test whose
controller or agent logged a traceback it did not declare."""

from __future__ import annotations

import gc
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from etcdrig import ETCD, SKIP_REASON, EtcdProc, etcd_cluster
from rig import PROC_LOGS, ControllerProc, MountProc, wait_for

from controller import faultpoints


@pytest.fixture
def controller(tmp_path: Path):
    c = ControllerProc(tmp_path / "state", tmp_path / "controller.log")
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def arm_faults():
    """arm_faults(spec): arm fault points in this process (VIRTFS_FAULTS syntax,
    controller/faultpoints.py), for an in-process controller; all are disarmed when the
    test ends. Processes are armed through their environment instead (rig.FAULTS_ENV)."""
    yield faultpoints.arm
    faultpoints.arm("")


# ---------------------------------------------------------------- real mounts


@pytest.fixture
def mount_factory(tmp_path: Path):
    """mount_factory(name='m', controller=None, args=[...], env={...}, prefix=[...]) -> a
    started MountProc (prefix: a command to run virtfs-mount under, e.g. strace)."""
    made: list[MountProc] = []

    def make(name: str = "m", *, state_dir: Path | None = None, controller: str | None = None,
             args: list[str] | None = None, env: dict[str, str] | None = None,
             prefix: list[str] | None = None) -> MountProc:
        m = MountProc(tmp_path / name, state_dir or tmp_path / "state",
                      tmp_path / f"{name}.log", controller=controller, args=args, env=env,
                      prefix=prefix)
        made.append(m)
        return m.start()

    yield make
    for m in reversed(made):
        m.close()


@pytest.fixture
def embedded(mount_factory):
    """A mount with an embedded controller, a 4 GiB default container and no disks."""
    return mount_factory("mnt", args=["--default-container-size", "4G"])


# ---------------------------------------------------------------- log hygiene

# What an unexpected failure looks like in a log: a traceback (log.exception, an
# uncaught exception), or an exception group (trio's nurseries), nested or not.
_BAD_LOG = re.compile(r"Traceback \(most recent call last\)|Exception Group Traceback|"
                      r"\b(?:Base)?ExceptionGroup\b")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "expect_log_errors(reason, match=None): this test makes a controller or agent log "
        "a traceback on purpose; match (a regex) limits which ones: each traceback block "
        "must contain a match",
    )


# ---------------------------------------------------------------- serial tests

# `make test` runs the suite in two phases: every test not marked serial on two pytest-xdist
# workers (most of a test's time is spent waiting on processes, leases and sockets, so two
# share the 2 cores well), then the serial ones alone. A test is serial when it bounds a
# time (a lease, a stall, a failover, a rate), measures memory, or loads the machine so that
# a neighbour's bounds would slip. Listed here: node ids under tests/ ("dir/", a module, or
# "module::test" with or without its parameters); a test may also carry @pytest.mark.serial.
SERIAL = (
    "etcd/",                        # leases, elections, failover times
    "multihost/",                   # network namespaces, fault timeouts, the torture run
    # the loop stalls < 100 ms during a checkpoint
    "inproc/test_checkpoint.py::test_loop_keeps_serving_and_commits_go_on_during_a_big_",
    "inproc/test_controller_races.py::test_acks_are_not_stuck_behind_a_burst_of_faults",
    "mount/test_qos.py",            # fio within 10% of a rate limit
    "mount/test_restart_grace.py",  # a write served within 1.5 s of a restart
    "mount/test_movement.py::test_container_fail_and_restore",  # EIO within 1 s
    "mount/test_fencing.py",        # leases run out on time
    "mount/test_mount_agents.py",   # an outage logged at growing intervals
    "mount/test_snapshots.py::test_snapshot_is_isolated_from_later_writes",  # < 5 s
    "mount/test_snap_rm_stall.py",  # another disk's I/O waits < 1 s during snap rm
    "process/test_hostile.py::test_slowloris_tls",
    "process/test_hostile.py::test_memory_does_not_grow_under_hostile_clients",
    "process/test_badinput.py::test_stalled_frames_do_not_block_others",  # < 5 s
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests of SERIAL's modules serial (see above)."""
    root = Path(__file__).parent
    for item in items:
        rel = item.path.relative_to(root).as_posix()
        node = f"{rel}::{item.name}"
        if any(node.startswith(s if s.endswith("/") or "::" in s else s + "::")
               for s in SERIAL):
            item.add_marker(pytest.mark.serial)


def log_problems(path: Path, allow: re.Pattern[str] | None = None) -> list[str]:
    """The unexpected tracebacks in a log file, each as its first ~30 lines.

    A block starts at a line matching _BAD_LOG and runs until the next line that
    looks like a new log record (starts with a 4-digit year) or 60 lines. With
    allow, a block that contains a match of it is expected and skipped.
    """
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not _BAD_LOG.search(lines[i]):
            i += 1
            continue
        j = i + 1
        while j < len(lines) and j - i < 60 and not re.match(r"\d{4}-\d\d-\d\d ", lines[j]):
            j += 1
        start = i - 1 if i and re.match(r"\d{4}-\d\d-\d\d ", lines[i - 1]) else i
        block = "\n".join(lines[start:j])
        if allow is None or not allow.search(block):
            out.append(f"{path}:{start + 1}:\n" + "\n".join(lines[start:start + 30]))
        i = j
    return out


@pytest.fixture(autouse=True, scope="module")
def collect_garbage_per_module() -> Iterator[None]:
    """gc.collect() as each test module ends.

    The suite runs with warnings as errors, so an object a test leaks in a reference
    cycle (an unclosed socket or file: a ResourceWarning in its finaliser) fails whatever
    test is running when the collector finds it; two such objects make pytest raise
    "ExceptionGroup: multiple unraisable exception warnings" there. Without this, that
    test is the first allocation-heavy one after the leak (TestFreeSpace, after
    tests/inproc, failed so once under load: issue 17); with it, the error is reported
    at the teardown of the leaking module's last test, naming the objects.
    """
    yield
    gc.collect()


@pytest.fixture(autouse=True)
def check_logs(request: pytest.FixtureRequest):
    """Fail a test whose controller or agent logs show an unexpected traceback.

    Runs after every other fixture's teardown (it is set up first), so it also sees
    what the processes logged while stopping. Opt out with
    @pytest.mark.expect_log_errors("why", match=REGEX).
    """
    first = len(PROC_LOGS)
    yield
    logs = list(dict.fromkeys(PROC_LOGS[first:]))
    del PROC_LOGS[first:]
    marker = request.node.get_closest_marker("expect_log_errors")
    if marker is not None and marker.kwargs.get("match") is None:
        return
    allow = re.compile(marker.kwargs["match"]) if marker is not None else None
    problems = [p for path in logs for p in log_problems(path, allow)]
    if problems:
        pytest.fail("unexpected traceback in a controller or agent log (mark the test "
                    "@pytest.mark.expect_log_errors(reason) if it is expected):\n"
                    + "\n\n".join(problems[:5]), pytrace=False)


# ---------------------------------------------------------------- TLS test PKI


@dataclass
class Pki:
    """A test CA with certificates made by openssl (docs/security.md's recipe).

    server: CN and SANs 127.0.0.1, ::1 and the multi-host tests' 10.77.1.1, 10.77.2.1 and
    10.77.3.1 (the controllers' addresses in their network namespaces);
    client: signed by ca; rogue_*: a client certificate from another CA;
    token: a 0600 file with a 64-hex-digit token.
    """

    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path
    token: Path

    def server_args(self, client_certs: bool = True) -> list[str]:
        return ["--tls-cert", str(self.server_cert), "--tls-key", str(self.server_key),
                "--token-file", str(self.token),
                *(["--tls-ca", str(self.ca)] if client_certs else [])]

    def client_args(self, cert: bool = True) -> list[str]:
        return ["--tls-ca", str(self.ca), "--token-file", str(self.token),
                *(["--tls-cert", str(self.client_cert), "--tls-key", str(self.client_key)]
                  if cert else [])]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


# the extensions docs/security.md's recipe gives: a CA that strict X.509 verification
# (VERIFY_X509_STRICT, Python 3.13's default and ours) accepts, and leaves for one purpose each
CA_EXT = ("basicConstraints=critical,CA:TRUE", "keyUsage=critical,keyCertSign,cRLSign")
LEAF_EXT = ("basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature")
SERVER_EXT = (*LEAF_EXT, "extendedKeyUsage=serverAuth")
CLIENT_EXT = (*LEAF_EXT, "extendedKeyUsage=clientAuth")


def _addext(exts: tuple[str, ...]) -> list[str]:
    return [a for e in exts for a in ("-addext", e)]


def make_pki(d: Path) -> Pki:
    """Make the test PKI in d as docs/security.md's recipe does (see Pki)."""
    d.mkdir(parents=True, exist_ok=True)
    for ca in ("ca", "rogue-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                 f"/CN={ca}", *_addext(CA_EXT), "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                 cwd=d)
    for name, ca, san in (("srv", "ca", "IP:127.0.0.1,IP:::1,IP:10.77.1.1,IP:10.77.2.1,"
                                 "IP:10.77.3.1"),
                          ("client", "ca", "DNS:agent"), ("rogue", "rogue-ca", "DNS:agent")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj",
                 f"/CN={'127.0.0.1' if name == 'srv' else name}", "-addext",
                 f"subjectAltName={san}",
                 *_addext(SERVER_EXT if name == "srv" else CLIENT_EXT),
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey",
                 f"{ca}.key", "-CAcreateserial", "-days", "2", "-copy_extensions", "copyall",
                 "-out", f"{name}.crt", cwd=d)
    token = d / "token"
    token.write_text(os.urandom(32).hex() + "\n")
    token.chmod(0o600)
    return Pki(d, d / "ca.crt", d / "srv.crt", d / "srv.key", d / "client.crt",
               d / "client.key", d / "rogue.crt", d / "rogue.key", token)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tcp_port(log_path: Path, timeout: float = 15.0) -> int:
    """The port a controller logged as "listening on tcp://HOST:PORT" (port 0 resolved)."""
    found: list[int] = []

    def seen() -> bool:
        m = re.search(r"listening on tcp://\S+:(\d+) ", log_path.read_text(errors="replace"))
        if m:
            found.append(int(m.group(1)))
        return bool(m)

    wait_for(seen, timeout, "the controller's TCP listener")
    return found[0]


# A real etcd member per test (tests/etcdrig.py), skipped only where etcd is missing. Here, not
# in tests/etcd/conftest.py: a second conftest module would shadow this one for `from conftest
# import ...` in other test files (CI caught it).
@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdProc]:
    """One etcd member on free loopback ports, data in tmp_path/etcd; killed at the end."""
    if ETCD is None:
        pytest.skip(SKIP_REASON)
    member = EtcdProc(tmp_path / "etcd", tmp_path / "etcd.log").start()
    try:
        yield member
    finally:
        member.stop()


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[list[EtcdProc]]:
    """Three members of one cluster on loopback, data under tmp_path; killed at the end."""
    if ETCD is None:
        pytest.skip(SKIP_REASON)
    members = etcd_cluster(tmp_path / "etcd3", 3)
    try:
        yield members
    finally:
        for m in members:
            m.stop()
