"""Disk names are file names: hidden, spaced, non-ASCII, up to 255 bytes (issue 9).

rsync, editors, `install` and downloaders write a hidden temporary name and
rename it into place; the same names must work through vdctl, where tables
quote them readably and JSON gives them exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from conftest import run_vdctl

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
