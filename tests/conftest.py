"""Shared fixtures: a real controller process on a real socket in tmp_path."""

from __future__ import annotations

import contextlib
import io
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from controller import cli

BIN = Path(sys.executable).parent


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def wait_for(pred: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise TimeoutError(f"timed out waiting for {what}")


class ControllerProc:
    """A virtfs-controller subprocess for one state dir."""

    def __init__(self, state_dir: Path, log_path: Path):
        self.state_dir = state_dir
        self.log_path = log_path
        self.sock = state_dir / "controller.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, extra: list[str] | None = None, wait: bool = True) -> None:
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(BIN / "virtfs-controller"), "--state-dir", str(self.state_dir), *(extra or [])],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"controller exited {self.proc.returncode}: "
                                   f"{self.log_path.read_text()[-2000:]}")
            return self.vdctl("status").rc == 0 if self.sock.exists() else False
        wait_for(ready, 15, "controller socket")

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        self.log.close()
        return rc

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None
        self.log.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def vdctl(self, *args: str) -> Result:
        return run_vdctl("--state-dir", str(self.state_dir), *args)


def run_vdctl(*args: str) -> Result:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = cli.main(list(args), out=out)
    return Result(rc, out.getvalue(), err.getvalue())


@pytest.fixture
def controller(tmp_path: Path):
    c = ControllerProc(tmp_path / "state", tmp_path / "controller.log")
    c.start()
    try:
        yield c
    finally:
        c.stop()


# ---------------------------------------------------------------- real mounts

from mounts import MountProc  # noqa: E402


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
