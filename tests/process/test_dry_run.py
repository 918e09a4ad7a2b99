"""-n/--dry-run (issue 17 item 8): for each verb that removes or cuts, the dry run
answers what the real run then does (its figures equal the real run's), refuses
what the real run refuses, and changes nothing: the tables (disk ls, snap ls,
container ls, disk map) and the journal are the same before and after it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rig import SEG, ControllerProc, add_container, agent, vd

B = 4096


def write_at(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def observe(c: ControllerProc) -> dict[str, Any]:
    """Everything a dry run must leave as it was."""
    disks = vd(c, "disk", "ls", "--format", "json").json()
    return {"disks": disks,
            "snaps": vd(c, "snap", "ls", "--format", "json").json(),
            "containers": vd(c, "container", "ls", "--format", "json").json(),
            "maps": {d["name"]: vd(c, "disk", "map", d["name"], "--format", "json").json()
                     for d in disks},
            "journal": (c.state_dir / "journal").stat().st_size}


def dry_then_real(c: ControllerProc, *args: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """vdctl ARGS -n, then vdctl ARGS: the dry run changed nothing, and its figures
    (keys) equal the real run's. The dry run's answer."""
    before = observe(c)
    dry = vd(c, *args, "-n", "--format", "json").json()
    assert dry.pop("dry_run") is True
    assert observe(c) == before, args
    real = vd(c, *args, "--format", "json").json()
    assert "dry_run" not in real
    assert {k: dry[k] for k in keys} == {k: real[k] for k in keys}, (args, dry, real)
    return dry


def test_dry_runs_answer_what_the_real_runs_do(controller, mount_factory, tmp_path):
    c = controller
    add_container(c, "c1", tmp_path / "c1.img", "1G")
    add_container(c, "c2", tmp_path / "c2.img", "64M")
    vd(c, "disk", "create", "d", "--size", "40M")
    vd(c, "disk", "create", "t", "--size", "8M", "--thick")
    vd(c, "disk", "create", "r", "--size", "1M")
    m = agent(mount_factory, c)
    d = m.path / "d"
    write_at(d, 0, os.urandom(5 * SEG + 12345))
    vd(c, "snap", "create", "d@s1")
    write_at(d, SEG + 100, os.urandom(3 * B))  # copy on write of segment 1
    vd(c, "snap", "create", "d@s2")
    write_at(d, 3 * SEG, os.urandom(2 * SEG))  # segments 3, 4 now only d's
    write_at(d, 8 * SEG, os.urandom(B))  # and a new one
    vd(c, "disk", "export-diff", "d@s1", str(tmp_path / "s1.diff"))

    # a refusal is the same refusal, and changes nothing
    before = observe(c)
    for args in (("disk", "rm", "d"), ("container", "rm", "c1"), ("snap", "rm", "d@nope"),
                 ("disk", "resize", "d", "1M")):
        dry, real = c.vdctl(*args, "-n"), c.vdctl(*args)
        assert dry.rc == real.rc == 1 and dry.err == real.err, (args, dry.err, real.err)
    assert observe(c) == before

    # the table form says what would happen in one line
    r = vd(c, "disk", "resize", "d", "16M", "--allow-shrink", "-n")
    assert r.out.startswith("dry run: d would shrink from 40M to 16M: the 24M past the new "
                            "end (bytes 16777216 to 41943040) would be discarded, "), r.out
    assert r.out.rstrip().endswith("of storage freed; nothing was changed"), r.out

    # a shrink: what it cuts off, what it frees, what the disk maps after
    dry = dry_then_real(c, "disk", "resize", "d", "16M", "--allow-shrink",
                        keys=("old_size", "size", "freed", "discarded", "allocated"))
    assert dry["discarded"] == [16 << 20, 40 << 20] and dry["size"] == 16 << 20
    assert dry["freed"] == 2 * SEG  # segments 4 (d's own since its write) and 8; 5 is
    # the snapshots' too
    # a thick grow: what it allocates
    dry = dry_then_real(c, "disk", "resize", "t", "+12M",
                        keys=("old_size", "size", "freed", "discarded", "allocated"))
    assert (dry["allocated"], dry["freed"], dry["discarded"]) == (20 << 20, 0, None)
    # rollback: the snapshots kept, what it frees
    dry = dry_then_real(c, "snap", "rollback", "d@s1", "--force",
                        keys=("old_size", "size", "freed", "newer_snapshots", "allocated"))
    assert dry["newer_snapshots"] == ["d@s2"] and dry["size"] == 40 << 20
    # snapshot removal: what only it holds
    dry = dry_then_real(c, "snap", "rm", "d@s2", keys=("name", "held", "size", "allocated"))
    assert dry["held"] == SEG  # s2's copy of segment 1
    dry = dry_then_real(c, "disk", "rm", "t", keys=("name", "freed", "size", "allocated"))
    assert dry["freed"] == 20 << 20
    dry_then_real(c, "container", "rm", "c2", keys=("name", "path", "size", "used", "lun"))

    # import-diff: the stream's figures, nothing written, no snapshot made
    r = vd(c, "disk", "import-diff", str(tmp_path / "s1.diff"), "r", "-n")
    assert r.out.startswith("dry run: ") and "r@s1 created; nothing was changed" in r.out
    dry = dry_then_real(c, "disk", "import-diff", str(tmp_path / "s1.diff"), "r",
                        keys=("snapshot", "old_size", "size", "records", "data", "zero"))
    assert (dry["old_size"], dry["size"], dry["snapshot"]) == (1 << 20, 40 << 20, "r@s1")
    assert dry["data"] + dry["zero"] <= 40 << 20 and dry["data"] >= 5 * SEG
