"""vdctl basics users reach for first (issue 9): --version, -H, human sizes in errors
and tables, a warning (not a refusal) when thin disks overcommit the pool, and a help
text that lists every size suffix that works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rig import add_container, disk_info, run_vdctl, vd

from controller.protocol import LABEL_BYTES

BIN = Path(sys.executable).parent


def test_version_on_every_program():
    for prog in ("vdctl", "virtfs-controller", "virtfs-mount"):
        r = subprocess.run([str(BIN / prog), "--version"], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0 and r.stdout.strip().startswith(prog + " 0."), (prog, r)


def test_help_lists_every_size_suffix():
    r = subprocess.run([str(BIN / "vdctl"), "--help"], capture_output=True, text=True,
                       timeout=30)
    text = " ".join(r.stdout.split())
    assert "K, M, G, T, P or E" in text and "iB" in text and "1.5T" in text


def test_no_headings_and_human_units(controller, tmp_path):
    add_container(controller, "c1", tmp_path / "c1.img", "64M")
    vd(controller, "disk", "create", "d", "--size", "1G")
    plain = vd(controller, "disk", "ls").out.splitlines()
    bare = vd(controller, "disk", "ls", "-H").out.splitlines()
    assert plain[0].startswith("NAME") and [ln.split() for ln in bare] == [
        ln.split() for ln in plain[1:]] != []
    assert vd(controller, "container", "ls", "--no-headings").out.split()[0] == "c1"
    # errors give sizes people read, with the exact bytes
    r = controller.vdctl("disk", "create", "big", "--size", "100M", "--thick")
    assert r.rc == 1 and "100M (104857600 bytes)" in r.err and "(66060288 bytes)" in r.err, r.err
    r = controller.vdctl("disk", "resize", "d", "1M")
    assert r.rc == 1 and "from 1G (1073741824 bytes) to 1M (1048576 bytes)" in r.err, r.err


def test_overcommit_is_a_warning(controller, tmp_path):
    add_container(controller, "c1", tmp_path / "c1.img", "64M")
    r = vd(controller, "disk", "create", "small", "--size", "32M")
    assert "warning" not in r.err
    r = vd(controller, "disk", "create", "huge", "--size", "10G")  # thin: allowed
    assert "vdctl: warning: disks now promise ~10G" in r.err and "(66060288 bytes)" in r.err, r.err
    r = vd(controller, "disk", "resize", "small", "+1G")
    assert "warning" in r.err
    j = run_vdctl("--state-dir", str(controller.state_dir), "disk", "create", "j", "--size",
                  "1G", "--format", "json")
    assert j.rc == 0 and "warning" in j.json()


def test_disk_rename_takes_its_snapshots_along(controller, tmp_path):
    add_container(controller, "c1", tmp_path / "c1.img", "64M")
    vd(controller, "disk", "create", "a", "--size", "8M")
    vd(controller, "snap", "create", "a@s1")
    r = vd(controller, "disk", "rename", "a", "b", "--format", "json").json()
    assert r["name"] == "b"
    names = [d["name"] for d in vd(controller, "disk", "ls", "--format", "json").json()]
    assert names == ["b"]
    snaps = vd(controller, "snap", "ls", "b", "--format", "json").json()
    assert [s["name"] for s in snaps] == ["b@s1"], snaps
    vd(controller, "disk", "create", "c", "--size", "8M")
    r = controller.vdctl("disk", "rename", "b", "c")
    assert r.rc == 1 and "already exists" in r.err, r.err


def test_rollback_past_newer_snapshots_keeps_them_and_says_so(controller, tmp_path):
    """zfs rollback must destroy newer snapshots (-r); virtfs keeps them whole, as rbd
    and LVM do, and names them."""
    add_container(controller, "c1", tmp_path / "c1.img", "64M")
    vd(controller, "disk", "create", "a", "--size", "8M")
    for s in ("s1", "s2", "s3"):
        vd(controller, "snap", "create", f"a@{s}")
    r = vd(controller, "snap", "rollback", "a@s1")
    assert "the newer snapshots a@s2, a@s3 are kept" in r.err, r.err
    snaps = vd(controller, "snap", "ls", "a", "--format", "json").json()
    assert [s["name"] for s in snaps] == ["a@s1", "a@s2", "a@s3"]
    r = vd(controller, "snap", "rollback", "a@s3", "--format", "json")
    assert r.json()["newer_snapshots"] == [] and r.err == ""


def test_overcommit_of_a_pinned_container_is_a_warning(controller, tmp_path):
    """A disk pinned to a container smaller than it: a warning naming the container,
    though the pool as a whole holds it; within the container, none."""
    add_container(controller, "small", tmp_path / "small.img",
                  str((100 << 20) + LABEL_BYTES))  # 100M of data, and its label
    add_container(controller, "big", tmp_path / "big.img", "10G")
    r = vd(controller, "disk", "create", "fits", "--size", "60M", "--container", "small")
    assert "warning" not in r.err, r.err
    r = vd(controller, "disk", "create", "x", "--size", "256M", "--container", "small")
    assert r.err.strip() == (
        "vdctl: warning: disks pinned to container 'small' now promise 316M (331350016 "
        "bytes), more than its 100M (104857600 bytes): writes will meet ENOSPC if they "
        "use it all"), r.err
    r = vd(controller, "disk", "create", "y", "--size", "1G")  # unpinned, the pool holds it
    assert "warning" not in r.err, r.err
    vd(controller, "disk", "rm", "x")
    r = vd(controller, "disk", "resize", "fits", "200M")
    assert "pinned to container 'small' now promise 200M" in r.err, r.err


def test_segment_larger_than_the_disk_is_refused(controller, tmp_path):
    add_container(controller, "c1", tmp_path / "c1.img", "1G")
    r = controller.vdctl("disk", "create", "d", "--size", "100G", "--segment-size", "1T")
    assert r.rc == 1 and r.err.strip() == (
        "vdctl: error: segment size 1T (1099511627776 bytes) is larger than the disk's "
        "size, 100G (107374182400 bytes)"), r.err
    assert vd(controller, "disk", "ls", "--format", "json").json() == []
    vd(controller, "disk", "create", "d", "--size", "64M", "--segment-size", "64M")
    vd(controller, "disk", "create", "e", "--size", "1M")  # the default segment: fine


def test_snapshots_through_disk_info_map_and_snap_ls(controller, tmp_path):
    """disk info and disk map take NAME@SNAP; snap ls without a disk lists every disk's
    snapshots; disk map -H drops its heading as every other table does."""
    add_container(controller, "c1", tmp_path / "c1.img", "1G")
    vd(controller, "disk", "create", "a", "--size", "8M", "--thick")
    vd(controller, "disk", "create", "b", "--size", "4M")
    for full in ("b@one", "a@one", "a@two"):
        vd(controller, "snap", "create", full)
    info = vd(controller, "disk", "info", "a@one", "--format", "json").json()
    assert (info["name"], info["snapshot"], info["disk"], info["allocated"]) == (
        "a@one", True, "a", 8 << 20)
    assert info["placement"] == [{"container": "c1", "bytes": 8 << 20}]
    assert "snapshot:       yes" in vd(controller, "disk", "info", "a@one").out
    m = vd(controller, "disk", "map", "a@two", "--format", "json").json()
    assert m["name"] == "a@two" and [(e["vstart"], e["length"], e["container"])
                                     for e in m["entries"]] == [(0, 8 << 20, "c1")]
    plain = vd(controller, "disk", "map", "a@two").out.splitlines()
    bare = vd(controller, "disk", "map", "a@two", "-H").out.splitlines()
    assert plain[0].split()[0] == "VSTART" and bare == plain[1:] != []
    r = controller.vdctl("disk", "info", "a@nope")
    assert r.rc == 1 and r.err.strip() == "vdctl: error: no such snapshot: 'a@nope'"
    every = [s["name"] for s in vd(controller, "snap", "ls", "--format", "json").json()]
    assert every == ["a@one", "a@two", "b@one"]
    assert [ln.split()[0] for ln in vd(controller, "snap", "ls", "-H").out.splitlines()
            ] == every
    assert [s["name"] for s in vd(controller, "snap", "ls", "b", "--format", "json").json()
            ] == ["b@one"]


def test_migrate_of_an_empty_thin_disk_moves_its_placement(controller, tmp_path):
    """An empty thin disk has nothing to move, but new space for it goes to the target
    from then on: the job ends done at once; asked again, one line says why not."""
    add_container(controller, "c1", tmp_path / "c1.img", "1G")
    add_container(controller, "c2", tmp_path / "c2.img", "1G")
    vd(controller, "disk", "create", "e", "--size", "1G")
    assert disk_info(controller, "e")["home"] == "c1"
    r = vd(controller, "disk", "migrate", "e", "--to", "c2")
    assert "done" in r.err, r.err
    assert disk_info(controller, "e")["home"] == "c2"
    assert vd(controller, "job", "ls", "--format", "json").json()[-1]["state"] == "done"
    r = controller.vdctl("disk", "migrate", "e", "--to", "c2")
    assert r.rc == 1 and r.err.strip() == (
        "vdctl: error: disk 'e' holds no data, and its new space goes to container 'c2' "
        "already"), r.err


def test_bytes_flag_gives_exact_counts(controller, tmp_path):
    """Sizes print one way (units.format_size: exact, or marked "~"); --bytes prints
    exact byte counts in tables, key: value lines and messages; JSON is always bytes."""
    add_container(controller, "c1", tmp_path / "c1.img", "64M")
    vd(controller, "disk", "create", "d", "--size", "12345", "--thick")
    vd(controller, "disk", "set", "d", "--write-bps-limit", "1.5M")
    info = vd(controller, "disk", "info", "d").out
    assert "size:           12345 (~12.1K)" in info and "write-bps 1.5M/s" in info, info
    info = vd(controller, "disk", "info", "d", "--bytes").out
    assert "size:           12345\n" in info and "write-bps 1572864/s" in info, info
    assert "  on c1: ~12.1K\n" in vd(controller, "disk", "info", "d").out
    assert "  on c1: 12345\n" in vd(controller, "disk", "info", "d", "--bytes").out
    row = vd(controller, "disk", "ls", "-H", "--bytes").out.split()
    assert row[:4] == ["d", "12345", "thick", "12345"], row
    assert vd(controller, "disk", "ls", "--format", "json", "--bytes").json()[0]["size"] \
        == 12345
    r = vd(controller, "disk", "rm", "d", "--bytes")
    assert r.err == "disk d removed (16384 bytes freed)\n", r.err  # whole blocks
    vd(controller, "disk", "create", "e", "--size", "300M")
    assert vd(controller, "disk", "ls", "-H").out.split()[:2] == ["e", "300M"]  # not 300.0M
