"""Disk names are file names: hidden, spaced, non-ASCII, up to 255 bytes (issue 9).

rsync, editors, `install` and downloaders write a hidden temporary name and
rename it into place; the same names must work through vdctl, where tables
quote them readably and JSON gives them exactly.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from rig import run_vdctl

ODD = [".hidden", "my disk", "ünïcödé 日本", "x" * 255, "-rf", "new\nline"]


def vd(m: Any, *args: str) -> Any:
    r = run_vdctl("--state-dir", str(m.state_dir), *args)
    assert r.rc == 0, r.err
    return r


def test_odd_names_through_the_mount_and_vdctl(embedded: Any) -> None:
    mnt: Path = embedded.path
    for name in ODD:
        with open(mnt / name, "wb") as f:
            f.write(name.encode() * 10)
    assert sorted(os.listdir(mnt)) == sorted(ODD)
    rows = json.loads(vd(embedded, "disk", "ls", "--format", "json").out)
    assert sorted(r["name"] for r in rows) == sorted(ODD)  # exact, in JSON
    table = vd(embedded, "disk", "ls").out
    assert "'my disk'" in table and "$'new\\x0aline'" in table
    assert "\nline" not in table  # never a raw control character in a table
    info = vd(embedded, "disk", "info", "my disk").out
    assert "name:           'my disk'" in info
    for name in ODD:
        assert (mnt / name).read_bytes() == name.encode() * 10
    # '@' is kept for snapshots; vdctl says so in one line
    r = run_vdctl("--state-dir", str(embedded.state_dir), "disk", "create", "a@b",
                  "--size", "1M")
    assert r.rc == 1 and "kept for snapshots" in r.err and len(r.err.splitlines()) == 1
    assert vd(embedded, "check").rc == 0


def test_rsync_into_the_mount(embedded: Any, tmp_path: Path) -> None:
    """rsync writes .NAME.XXXXXX and renames it over NAME: a new file, then an update
    that rsync's quick check (size and mtime, kept by the mount) must notice."""
    src = tmp_path / "image.raw"
    src.write_bytes(os.urandom(3 << 20) + bytes(1 << 20) + os.urandom(12345))
    for flags in (["-a"], ["-a"]):
        r = subprocess.run(["rsync", *flags, str(src), str(embedded.path) + "/"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert (embedded.path / "image.raw").read_bytes() == src.read_bytes()
        assert os.listdir(embedded.path) == ["image.raw"]  # no temporary left behind
        with open(src, "r+b") as f:  # change it for the second round
            f.seek(1 << 20)
            f.write(os.urandom(4096))
        st = src.stat()  # a later mtime, whole seconds apart (rsync's quick check)
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10 * 10**9))


def test_rename_over_an_open_target_fails_and_keeps_both(embedded):
    a, b = embedded.path / "a", embedded.path / "b"
    a.write_bytes(b"A" * 4096)
    b.write_bytes(b"B" * 4096)
    with open(b, "rb"):
        with pytest.raises(OSError) as ei:
            os.rename(a, b)
        assert ei.value.errno == errno.EBUSY
        assert sorted(os.listdir(embedded.path)) == ["a", "b"]
    assert b.read_bytes() == b"B" * 4096
    # closed: rename(2) replaces the target atomically
    os.rename(a, b)
    assert os.listdir(embedded.path) == ["b"]
    assert b.read_bytes() == b"A" * 4096
    r = vd_json(embedded, "container", "ls")
    assert r[0]["used"] == 4096  # the replaced disk's block was freed


def vd_json(m, *args):
    from rig import run_vdctl

    r = run_vdctl("--state-dir", str(m.state_dir), *args, "--format", "json")
    assert r.rc == 0, r.err
    return r.json()
