"""vdctl's --owner, --group and --mode (disk create, disk set) and what disk info shows
(docs/permissions.md), against a real controller; bad input is one line, nothing lost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from rig import add_container, disk_info, vd


@pytest.fixture
def pool(controller: Any, tmp_path: Path) -> Any:
    add_container(controller, "c1", tmp_path / "c1.img", "64M")
    return controller


def test_create_set_and_info(pool: Any) -> None:
    vd(pool, "disk", "create", "plain", "--size", "1M")
    info = disk_info(pool, "plain")
    assert (info["owner"], info["group"], info["mode"]) == (None, None, None)
    text = vd(pool, "disk", "info", "plain").out
    assert "owner:          - (the mounting user)" in text and "mode:           - (0644)" in text

    r = vd(pool, "disk", "create", "vm1", "--size", "1M", "--owner", "nobody", "--group",
           "nogroup", "--mode", "0640", "--format", "json").json()
    assert (r["owner"], r["group"], r["mode"]) == (65534, 65534, 0o640)
    text = vd(pool, "disk", "info", "vm1").out
    assert "owner:          65534 (nobody)" in text, text
    assert "group:          65534 (nogroup)" in text and "mode:           0640" in text, text

    r = vd(pool, "disk", "set", "vm1", "--mode", "600", "--format", "json").json()
    assert (r["owner"], r["group"], r["mode"]) == (65534, 65534, 0o600)  # the rest kept
    vd(pool, "disk", "set", "vm1", "--owner", "0", "--group", "daemon")
    info = disk_info(pool, "vm1")
    assert (info["owner"], info["group"], info["mode"]) == (0, 1, 0o600)
    # with QoS limits in one command: both are set
    vd(pool, "disk", "set", "vm1", "--mode", "0660", "--iops-limit", "100")
    info = disk_info(pool, "vm1")
    assert info["mode"] == 0o660 and info["qos"] == {"iops": 100}
    assert any(r["name"] == "vm1" and r["mode"] == 0o660
               for r in vd(pool, "disk", "ls", "--format", "json").json())


@pytest.mark.parametrize(("args", "msg"), [
    (["disk", "create", "x", "--size", "1M", "--owner", "no-such-user-x"],
     "unknown user 'no-such-user-x'"),
    (["disk", "create", "x", "--size", "1M", "--group", "no-such-group-x"],
     "unknown group 'no-such-group-x'"),
    (["disk", "create", "x", "--size", "1M", "--mode", "0999"], "bad mode '0999'"),
    (["disk", "set", "d", "--mode", "u+rw"], "bad mode 'u+rw'"),
    (["disk", "set", "d", "--mode", "4755"], "bad mode '4755'"),
    (["disk", "set", "d", "--owner", "no-such-user-x"], "unknown user 'no-such-user-x'"),
    (["disk", "set", "d"], "give at least one limit"),
    (["disk", "set", "nope", "--mode", "0600"], "no such disk"),
    (["disk", "set", "d@s", "--mode", "0600"], "is a snapshot: read-only"),
])
def test_bad_input_is_one_line_and_changes_nothing(pool: Any, args: list[str],
                                                    msg: str) -> None:
    vd(pool, "disk", "create", "d", "--size", "1M", "--mode", "0640")
    vd(pool, "snap", "create", "d@s")
    r = pool.vdctl(*args)
    assert r.rc != 0 and r.err.count("\n") == 1 and msg in r.err, r.err
    assert r.out == ""
    assert "x" not in {d["name"] for d in vd(pool, "disk", "ls", "--format", "json").json()}
    assert disk_info(pool, "d")["mode"] == 0o640
