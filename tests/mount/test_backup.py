"""Changed-block tracking and incremental backup (issue 17 item 1) on real mounts:
`vdctl snap diff`, `disk export-diff` and `disk import-diff`, with the data read
back through the mount and qemu-img compare (or cmp) as the oracle."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from rig import SEG, add_container, agent, run, vd

from controller import diffstream as S

B = 4096


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
        os.fsync(f.fileno())


def punch(path: Path, offset: int, length: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        from controller.storage import punch_hole
        punch_hole(fd, offset, length)
        os.fsync(fd)
    finally:
        os.close(fd)


def diff(c, *names: str) -> list[dict]:
    return vd(c, "snap", "diff", *names, "--format", "json").json()


def test_snap_diff_lists_what_changed(controller, mount_factory, tmp_path):
    add_container(controller, "c1", tmp_path / "c1.img", "1G")
    vd(controller, "disk", "create", "d", "--size", "64M")
    m = agent(mount_factory, controller)
    d = m.path / "d"
    write_at(d, 0, os.urandom(8 * SEG))  # segments 0-7
    vd(controller, "snap", "create", "d@s1")
    assert diff(controller, "d@s1", "d") == []  # the disk is its snapshot
    write_at(d, 2 * SEG + 5 * B, os.urandom(3 * B))  # into segment 2 (copy on write)
    write_at(d, 10 * SEG, os.urandom(B))  # a new segment 10
    punch(d, 5 * SEG, SEG)  # segment 5 discarded: zero
    vd(controller, "snap", "create", "d@s2")
    want = [{"offset": 2 * SEG, "length": SEG, "exists": True, "type": "data"},
            {"offset": 5 * SEG, "length": SEG, "exists": False, "type": "zero"},
            {"offset": 10 * SEG, "length": SEG, "exists": True, "type": "data"}]
    assert diff(controller, "d@s1", "d@s2") == want
    assert diff(controller, "d@s1") == want  # against the disk, the default
    assert diff(controller, "d@s2", "d") == []
    write_at(d, 7 * SEG, b"x")
    assert diff(controller, "d@s2") == [{"offset": 7 * SEG, "length": SEG, "exists": True,
                                         "type": "data"}]
    r = vd(controller, "snap", "diff", "d@s1", "d@s2")
    assert r.out.split("\n")[0].split() == ["OFFSET", "LENGTH", "TYPE"]
    assert r.out.split("\n")[2].split() == ["20M", "4M", "zero"]  # exact, in units
    assert "3 ranges, 8M data, 4M zero" in r.err
    r = vd(controller, "snap", "diff", "d@s1", "d@s2", "--bytes", "-H")
    assert r.out.split("\n")[1].split() == [str(5 * SEG), str(SEG), "zero"]
    # refusals, one line each
    vd(controller, "disk", "create", "e", "--size", "1M")
    vd(controller, "snap", "create", "e@s1")
    for args, msg in [(("d@s2", "d@s1"), "newer than"), (("e@s1", "d"), "not a snapshot of"),
                      (("d@nope",), "no such snapshot"), (("d",), "NAME@SNAP"),
                      (("d@s1", "nope"), "no such disk")]:
        r = controller.vdctl("snap", "diff", *args)
        assert r.rc == 1 and msg in r.err and r.err.count("\n") == 1, (args, r.err)



def apply_stream(raw: bytes, base: bytes) -> tuple[bytes, str, str]:
    """base with the stream raw applied, as a bytearray model: (result, FROM, TO)."""
    r = S.StreamReader(io.BytesIO(raw))
    h = r.header()
    img = bytearray(base[:h.size].ljust(h.size, b"\0"))
    for rec in r.records():
        img[rec.offset:rec.end] = rec.data if rec.data is not None else bytes(rec.length)
    return bytes(img), h.from_snap, h.to_snap


def test_export_streams_hold_the_snapshots(controller, mount_factory, tmp_path):
    """The streams applied to a bytearray model (full, then incremental) give each
    snapshot's bytes as the mount reads them; an incremental export reads only the
    changed segments (container reads counted through the stream's size)."""
    add_container(controller, "c1", tmp_path / "c1.img", "1G")
    vd(controller, "disk", "create", "d", "--size", "24M")
    m = agent(mount_factory, controller)
    d = m.path / "d"
    write_at(d, 0, os.urandom(3 * SEG + 100))
    write_at(d, 4 * SEG, bytes(SEG))  # allocated zeros: a zero record, no data
    vd(controller, "snap", "create", "d@a")
    write_at(d, 2 * SEG + 7, b"changed")
    punch(d, 0, SEG)
    with open(d, "r+b") as f:
        f.truncate(20 << 20 + 5)
    vd(controller, "snap", "create", "d@b")
    full, inc = tmp_path / "full", tmp_path / "inc"
    r = vd(controller, "disk", "export-diff", "d@a", str(full))
    assert "exported d@a (full): 16M data, 8M zero" in r.err, r.err
    r = vd(controller, "disk", "export-diff", "d@b", "--from-snap", "d@a", str(inc))
    assert "exported d@b since d@a: 4M data" in r.err, r.err
    assert not list(tmp_path.glob("*.part"))
    img_a, frm, to = apply_stream(full.read_bytes(), b"")
    assert (frm, to) == ("", "a") and img_a == (m.path / "d@a").read_bytes()
    img_b, frm, to = apply_stream(inc.read_bytes(), img_a)
    assert (frm, to) == ("a", "b") and img_b == (m.path / "d@b").read_bytes()
    assert img_b != img_a  # the oracle can tell them apart
    assert SEG < inc.stat().st_size < SEG + 200  # one segment's data, two small records
    r = controller.vdctl("disk", "export-diff", "d", str(tmp_path / "x"))
    assert r.rc == 1 and "is not NAME@SNAP" in r.err and not (tmp_path / "x").exists()
    r = controller.vdctl("disk", "export-diff", "d@a", "--from-snap", "b", str(tmp_path / "x"))
    assert r.rc == 1 and "newer than" in r.err and not (tmp_path / "x").exists()
    r = controller.vdctl("disk", "export-diff", "d@a", str(tmp_path / "no" / "x"))
    assert r.rc == 1 and "No such file or directory" in r.err and r.err.count("\n") == 1
    r = controller.vdctl("disk", "import-diff", str(tmp_path / "no" / "x"), "d")
    assert r.rc == 1 and "No such file or directory" in r.err and r.err.count("\n") == 1
    vd(controller, "container", "fail", "c1")  # the snapshot cannot be read: one line
    r = controller.vdctl("disk", "export-diff", "d@a", str(tmp_path / "x"))
    assert r.rc == 1 and "container 'c1' has failed" in r.err and r.err.count("\n") == 1
    assert not list(tmp_path.glob("x*"))  # no stream, no temp file
    vd(controller, "container", "restore", "c1")
    fifo = tmp_path / "fifo"  # not a regular file: written directly, no temp name
    os.mkfifo(fifo)
    with open(tmp_path / "from-fifo", "wb") as sink, \
            subprocess.Popen(["cat", str(fifo)], stdout=sink) as cat:
        vd(controller, "disk", "export-diff", "d@b", "--from-snap", "a", str(fifo))
        assert cat.wait(30) == 0
    assert (tmp_path / "from-fifo").read_bytes() == inc.read_bytes()


def compare(a: Path, b: Path) -> int:
    """qemu-img compare's exit code: 0 same, 1 differ."""
    r = run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(a), str(b)],
            check=False)
    assert r.returncode in (0, 1), r.stdout + r.stderr
    return r.returncode


def test_full_and_incremental_exports_restore_every_snapshot(controller, mount_factory,
                                                              tmp_path):
    add_container(controller, "c1", tmp_path / "c1.img", "1G")
    vd(controller, "disk", "create", "d", "--size", "40M")
    vd(controller, "disk", "create", "r", "--size", "1M")  # the restore target
    m = agent(mount_factory, controller)
    d = m.path / "d"
    write_at(d, 0, os.urandom(5 * SEG + 12345))  # partly written segment 5
    write_at(d, 8 * SEG, bytes(SEG))  # a segment of zeros (exported as a zero record)
    vd(controller, "snap", "create", "d@s1")
    write_at(d, SEG + 100, os.urandom(3 * B))  # sub-block, copy on write
    punch(d, 3 * SEG, 2 * SEG)  # two segments discarded
    write_at(d, 9 * SEG - 10, os.urandom(20))  # across a segment edge
    vd(controller, "snap", "create", "d@s2")
    with open(d, "r+b") as f:  # grow, and write past the old end
        f.truncate(48 << 20)
    write_at(d, 44 << 20, os.urandom(SEG))
    write_at(d, 0, os.urandom(100))
    vd(controller, "snap", "create", "d@s3")
    streams = {}
    for to, frm in (("s1", None), ("s2", "s1"), ("s3", "d@s2")):
        streams[to] = tmp_path / f"{to}.diff"
        args = ["disk", "export-diff", f"d@{to}", str(streams[to])]
        r = vd(controller, *args, *(["--from-snap", frm] if frm else []))
        assert "exported d@" + to in r.err
    assert streams["s1"].read_bytes().startswith(b"virtfs diff\n")
    # an incremental stream holds only what changed: s2 rewrote 3 segments (1, 8, 9)
    assert 3 * SEG < streams["s2"].stat().st_size < 3 * SEG + 4096 < streams["s1"].stat().st_size
    # a stream that does not start from r's newest snapshot is refused, nothing applied
    r = controller.vdctl("disk", "import-diff", str(streams["s2"]), "r")
    assert r.rc == 1 and "it has no snapshots" in r.err and r.err.count("\n") == 1, r.err
    for to in ("s1", "s2", "s3"):
        r = vd(controller, "disk", "import-diff", str(streams[to]), "r")
        assert f"snapshot r@{to} created" in r.err
        assert compare(m.path / f"r@{to}", m.path / f"d@{to}") == 0, to
    assert compare(m.path / "r", m.path / "d") == 0
    # the oracle can fail: r@s1 is not d@s2
    assert compare(m.path / "r@s1", m.path / "d@s2") == 1
    assert [s["name"] for s in vd(controller, "snap", "ls", "r", "--format", "json").json()] \
        == ["r@s1", "r@s2", "r@s3"]
    r = controller.vdctl("disk", "import-diff", str(streams["s3"]), "r")
    assert r.rc == 1 and "does not fit" in r.err and "'s3'" in r.err, r.err
    # an incremental export of nothing changed is a header and an end record
    vd(controller, "snap", "create", "d@s4")
    vd(controller, "disk", "export-diff", "d@s4", "--from-snap", "s3", str(tmp_path / "s4"))
    assert (tmp_path / "s4").stat().st_size < 100


def test_damaged_streams_are_refused_and_nothing_is_applied(controller, mount_factory,
                                                            tmp_path):
    add_container(controller, "c1", tmp_path / "c1.img", "1G")
    vd(controller, "disk", "create", "d", "--size", "16M")
    m = agent(mount_factory, controller)
    write_at(m.path / "d", 0, os.urandom(16 << 20))
    vd(controller, "snap", "create", "d@s1")
    write_at(m.path / "d", SEG, os.urandom(2 * SEG))
    vd(controller, "snap", "create", "d@s2")
    full, inc = tmp_path / "full", tmp_path / "inc"
    # through pipes, as a backup script runs it: vdctl processes, stdout and stdin
    vdctl = [str(Path(sys.executable).parent / "vdctl"), "--state-dir",
             str(controller.state_dir)]
    vd(controller, "disk", "create", "r", "--size", "1M")
    with subprocess.Popen([*vdctl, "disk", "export-diff", "d@s1", "-"],
                          stdout=subprocess.PIPE) as exp:
        imp = subprocess.run([*vdctl, "disk", "import-diff", "-", "r"], stdin=exp.stdout,
                             capture_output=True, text=True, timeout=120)
    assert exp.returncode == 0 and imp.returncode == 0, imp.stderr
    assert compare(m.path / "r@s1", m.path / "d@s1") == 0
    vd(controller, "disk", "export-diff", "d@s1", str(full))
    vd(controller, "disk", "export-diff", "d@s2", "--from-snap", "s1", str(inc))
    raw = inc.read_bytes()
    before = (m.path / "r").read_bytes()
    flipped = bytearray(raw)
    flipped[5000] ^= 0x10  # a bit inside the first data record
    cases = {
        "flipped": (bytes(flipped), "bad checksum"),
        "truncated": (raw[:-1000], "truncated"),
        "cut at a record": (raw[:len(raw) - 33], "truncated"),
        "bad magic": (b"rbd diff v1\n" + raw[12:], "bad magic"),
        "empty": (b"", "bad magic"),
    }
    for what, (data, msg) in cases.items():
        bad = tmp_path / "bad"
        bad.write_bytes(data)
        r = controller.vdctl("disk", "import-diff", str(bad), "r")
        assert r.rc == 1 and msg in r.err and "nothing applied" in r.err, (what, r.err)
        assert r.err.count("\n") == 1, (what, r.err)
        # through stdin too (spooled and checked before anything is written)
        p = subprocess.run([*vdctl, "disk", "import-diff", "-", "r"], input=data,
                           capture_output=True, timeout=60)
        assert p.returncode == 1 and msg.encode() in p.stderr, (what, p.stderr)
        assert (m.path / "r").read_bytes() == before, what
        assert [s["name"] for s in vd(controller, "snap", "ls", "r", "--format",
                                      "json").json()] == ["r@s1"], what
    # the whole stream then applies
    vd(controller, "disk", "import-diff", str(inc), "r")
    assert compare(m.path / "r@s2", m.path / "d@s2") == 0
    # a disk written since its newest snapshot: applied, with a warning
    vd(controller, "disk", "create", "w", "--size", "16M")
    vd(controller, "disk", "import-diff", str(full), "w")
    write_at(m.path / "w", 3 * SEG, b"local change")  # where the stream does not write
    r = vd(controller, "disk", "import-diff", str(inc), "w")
    assert "changed since w@s1" in r.err
    assert compare(m.path / "w@s2", m.path / "d@s2") == 1  # it kept the local change
    r = controller.vdctl("disk", "import-diff", str(full), "w")  # its TO is there already
    assert r.rc == 1 and "snapshot w@s1 exists already" in r.err
    # no mount shows the disk there: refused before anything is written
    vd(controller, "disk", "create", "x", "--size", "1M")
    r = controller.vdctl("disk", "import-diff", str(full), "x", "--mount", str(tmp_path))
    assert r.rc == 1 and "is not a disk file" in r.err
    assert (m.path / "x").stat().st_size == 1 << 20
