"""Real mounts for tests: virtfs-mount as a subprocess, always unmounted in teardown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def fusermount_u(path: Path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, check=False)


class MountProc:
    """One agent (virtfs-mount) on its own mountpoint."""

    def __init__(self, mnt: Path, state_dir: Path, log_path: Path, *,
                 controller: str | None = None, args: list[str] | None = None,
                 env: dict[str, str] | None = None, prefix: list[str] | None = None):
        self.path = mnt
        self.state_dir = state_dir
        self.log_path = log_path
        self.controller = controller
        self.args = args or []
        self.env = env or {}
        self.prefix = prefix or []  # e.g. strace fault injection; .pid is then the prefix's
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> MountProc:
        self.path.mkdir(parents=True, exist_ok=True)
        cmd = [*self.prefix, str(BIN / "virtfs-mount"), str(self.path),
               "--state-dir", str(self.state_dir), *self.args]
        if self.controller:
            cmd += ["--controller", self.controller]
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **self.env})
        log.close()
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"virtfs-mount exited {self.proc.returncode}:\n"
                                   f"{self.log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.path} not mounted:\n{self.log_path.read_text()}")
            time.sleep(0.02)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def unmount(self, timeout: float = 30) -> int:
        """A clean unmount (fusermount3 -u); returns the agent's exit code."""
        assert self.proc is not None
        subprocess.run(["fusermount3", "-u", str(self.path)], check=True, capture_output=True)
        rc = self.proc.wait(timeout)
        self.proc = None
        return rc

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None
        fusermount_u(self.path)

    def close(self) -> None:
        """Teardown: never leaves a mount behind."""
        fusermount_u(self.path)
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
