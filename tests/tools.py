"""Client tools as test oracles: fio, e2fsck, qemu-img, dd. Each runs from a temp dir."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path


def run(cmd: list[str], *, cwd: str | Path | None = None, check: bool = True,
        timeout: float = 600) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-3000:]}")
    return p


def fio(filename: Path, *args: str, check: bool = True, cwd: Path | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """fio in a temp dir (it drops *-verify.state files in the current directory)."""
    with tempfile.TemporaryDirectory() as tmp:
        return run(["fio", "--name=v", f"--filename={filename}", *args],
                   cwd=cwd or tmp, check=check, timeout=timeout)


FIO_VERIFY = ["--bs=4k", "--rw=randwrite", "--ioengine=psync", "--verify=crc32c",
              "--verify_fatal=1", "--fallocate=none", "--randrepeat=1"]
