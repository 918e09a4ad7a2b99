"""Changed-block tracking and incremental backup (issue 17 item 1) on real mounts:
`vdctl snap diff`, `disk export-diff` and `disk import-diff`, with the data read
back through the mount and qemu-img compare (or cmp) as the oracle."""

from __future__ import annotations

import io
import os
from pathlib import Path

from rig import SEG, add_container, agent, vd

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
    assert r.out.split("\n")[2].split() == [str(5 * SEG), str(SEG), "zero"]
    assert "3 ranges, 8M data, 4M zero" in r.err
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
