"""examples/systemd/: the units pass `systemd-analyze verify`, and the daemons they start
tell the service manager they are ready (Type=notify) only once they serve.

There is no systemd to run the units here, so the tests take each unit's ExecStart= as
systemd would (its Environment= defaults, %f, $VAR and ${VAR}), run it with
NOTIFY_SOCKET set to a datagram socket of their own, and read what arrives. strace
delays the step readiness must wait for (the listener's bind, the FUSE mount), so a
notice sent too early shows.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from rig import BIN, PROC_LOGS, ControllerProc, fusermount_u

from controller import codec, sdnotify

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "examples" / "systemd"
INSTALL_BIN = "/opt/virtfs/bin"  # where README's install section puts the venv
STATE = "/var/lib/virtfs"
DELAY_US = 1_500_000  # how long strace holds the step readiness must follow


# ---------------------------------------------------------------- the units


def unit_with_bin(name: str) -> str:
    """The unit's text with its executables in this venv (systemd-analyze checks them)."""
    text = (UNITS / name).read_text()
    assert f"{INSTALL_BIN}/" in text
    return text.replace(INSTALL_BIN, str(BIN))


def verify(d: Path, unit: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", str(d / unit)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_units_pass_systemd_analyze_verify(tmp_path):
    for name in ("virtfs-controller.service", "virtfs-mount@.service"):
        (tmp_path / name).write_text(unit_with_bin(name))
    for unit in ("virtfs-controller.service", "virtfs-mount@mnt-vd.service"):
        r = verify(tmp_path, unit)
        assert r.returncode == 0 and r.stdout + r.stderr == "", (unit, r.stdout, r.stderr)
    # the check can fail: verify reports a misspelt key (with rc 0, hence the output
    # check above) and a missing executable (rc 1)
    (tmp_path / "virtfs-mount@.service").write_text(
        unit_with_bin("virtfs-mount@.service").replace("KillMode=mixed", "KillMod=mixed"))
    r = verify(tmp_path, "virtfs-mount@mnt-vd.service")
    assert "Unknown key 'KillMod'" in r.stderr, r.stderr
    (tmp_path / "virtfs-controller.service").write_text(
        (UNITS / "virtfs-controller.service").read_text().replace(INSTALL_BIN, "/nonexistent"))
    r = verify(tmp_path, "virtfs-controller.service")
    assert r.returncode != 0 and "not executable" in r.stderr, r.stderr


def test_units_say_what_the_tests_rely_on():
    """Type=notify (readiness), restart on failure, ordering after the network and
    local file systems, a clean stop by SIGTERM (the default KillSignal)."""
    for name in ("virtfs-controller.service", "virtfs-mount@.service"):
        keys = unit_keys(name)
        assert keys["Type"] == ["notify"] and keys["Restart"] == ["on-failure"]
        after = " ".join(keys["After"]).split()
        assert {"network-online.target", "local-fs.target"} <= set(after)
        assert "network-online.target" in " ".join(keys["Wants"])
        assert "KillSignal" not in keys
    assert "virtfs-controller.service" in " ".join(unit_keys("virtfs-mount@.service")["After"])


def unit_keys(name: str) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        m = re.match(r"([A-Za-z]+)=(.*)", line)
        if m:
            keys.setdefault(m.group(1), []).append(m.group(2))
    return keys


def exec_start(name: str, *, state_dir: Path, instance_path: str = "",
               env: dict[str, str] | None = None) -> list[str]:
    """The unit's ExecStart= as systemd would run it: Environment= defaults (env
    overrides them, as EnvironmentFile= does), %f, "$VAR" (split into words) and
    "${VAR}" (one word); /opt/virtfs/bin and /var/lib/virtfs made this venv's and
    state_dir."""
    keys = unit_keys(name)
    values: dict[str, str] = {}
    for e in keys.get("Environment", []):
        k, _, v = e.partition("=")
        values[k] = v
    values.update(env or {})
    words: list[str] = []
    for w in shlex.split(keys["ExecStart"][0]):
        w = w.replace("%f", instance_path).replace(STATE, str(state_dir))
        w = w.replace(INSTALL_BIN, str(BIN))
        if m := re.fullmatch(r"\$([A-Za-z_]+)", w):
            words += values.get(m.group(1), "").split()
        else:
            words.append(re.sub(r"\$\{([A-Za-z_]+)\}", lambda m: values.get(m.group(1), ""),
                                w).replace(STATE, str(state_dir)))
    return words


# ---------------------------------------------------------------- readiness


class Notices:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def next(self, timeout: float) -> dict[str, str] | None:
        """The next notice as {KEY: VALUE}, or None if none comes within timeout s."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        return dict(line.split("=", 1) for line in data.decode().splitlines())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notices(tmp_path) -> Iterator[Notices]:
    n = Notices(tmp_path / "notify.sock")
    yield n
    n.close()


def delayed(syscall: str) -> list[str]:
    """A command prefix that holds every `syscall` DELAY_US before it enters."""
    if shutil.which("strace") is None:
        pytest.skip("needs strace")
    return ["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}",
            "-e", f"inject={syscall}:delay_enter={DELAY_US}"]


@contextmanager
def process(cmd: list[str], log_path: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    PROC_LOGS.append(log_path)
    with open(log_path, "ab") as log:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, env={**os.environ, **env})
    try:
        yield p
    finally:
        if p.poll() is None:
            for pid in children(p.pid):  # strace's tracee would outlive a killed strace
                os.kill(pid, signal.SIGKILL)
            p.kill()
        p.wait(30)


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def traced(p: subprocess.Popen) -> int:
    """The pid of the process strace (p) runs: signals go to it (strace would detach)."""
    kids = children(p.pid)
    assert len(kids) == 1, kids
    return kids[0]


def hello(sock_path: Path) -> dict:
    """One hello on the controller's Unix socket, at once (no retry)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        s.sendall(codec.wire_frame({"id": 1, "op": "hello",
                                    "args": {"version": 2, "role": "admin"}}))
        head = s.recv(4)
        return codec.unpack(s.recv(codec.wire_length(head, max_size=1 << 20)),
                            max_size=1 << 20)


def test_controller_is_ready_only_once_it_listens(tmp_path, notices):
    state = tmp_path / "state"
    cmd = exec_start("virtfs-controller.service", state_dir=state)
    assert cmd[0] == str(BIN / "virtfs-controller")
    sock = state / "controller.sock"
    env = {"NOTIFY_SOCKET": str(notices.path)}
    with process([*delayed("bind"), *cmd], tmp_path / "ctl.log", env) as p:
        # the listener's bind is held: no notice, and nothing to connect to
        assert notices.next(DELAY_US / 1e6 * 0.6) is None
        assert not sock.exists()
        ready = notices.next(60)
        assert ready is not None and ready.get("READY") == "1", ready
        assert ready["STATUS"].startswith("serving unix:")
        reply = hello(sock)  # accepted at once: READY came after listen()
        assert reply["ok"], reply
        os.kill(traced(p), signal.SIGTERM)
        stopping = notices.next(30)
        assert stopping is not None and stopping.get("STOPPING") == "1", stopping
        assert p.wait(60) == 0
        assert notices.next(0.2) is None  # one READY, one STOPPING, nothing else


def test_mount_is_ready_only_once_mounted(tmp_path, notices):
    ctl = ControllerProc(tmp_path / "state", tmp_path / "ctl.log")
    ctl.start()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        assert ctl.vdctl("container", "add", "c1", str(tmp_path / "c1.img"),
                         "--size", "64M").rc == 0
        assert ctl.vdctl("disk", "create", "d", "--size", "8M").rc == 0
        cmd = exec_start("virtfs-mount@.service", state_dir=tmp_path / "state",
                         instance_path=str(mnt))
        assert cmd[:2] == [str(BIN / "virtfs-mount"), str(mnt)]
        assert cmd[2:4] == ["--controller", ctl.addr]  # never an embedded controller
        env = {"NOTIFY_SOCKET": str(notices.path)}
        with process([*delayed("mount"), *cmd], tmp_path / "m.log", env) as p:
            t0 = time.monotonic()
            ready = notices.next(60)
            assert ready is not None and ready.get("READY") == "1", ready
            assert time.monotonic() - t0 >= DELAY_US / 1e6 * 0.9  # it waited for the mount
            assert os.path.ismount(mnt)
            assert os.listdir(mnt) == ["d"]  # and the mount serves
            assert ready["STATUS"] == f"{mnt} mounted (controller {ctl.addr})"
            os.kill(traced(p), signal.SIGTERM)
            stopping = notices.next(30)
            assert stopping is not None and stopping.get("STOPPING") == "1", stopping
            assert p.wait(60) == 0
            assert not os.path.ismount(mnt)
    finally:
        fusermount_u(mnt)
        ctl.stop()


# ---------------------------------------------------------------- the protocol


def test_notify_abstract_socket_and_no_socket(caplog, monkeypatch):
    monkeypatch.setattr(sdnotify, "_warned", False)
    name = f"virtfs-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind("\0" + name)
        rx.settimeout(5)
        assert sdnotify.notify("READY=1", "STATUS=x", env={"NOTIFY_SOCKET": "@" + name})
        assert rx.recv(100) == b"READY=1\nSTATUS=x"
    assert not sdnotify.notify("READY=1", env={})  # not run by a service manager
    # a manager that went away, or an address kind we do not speak: dropped, logged
    # once, never raised
    assert not sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": "/nonexistent/notify"})
    assert not sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": "vsock:2:1234"})
    warnings = [r for r in caplog.records if r.name == "controller.sdnotify"]
    assert len(warnings) == 1 and "/nonexistent/notify" in warnings[0].getMessage()
