"""The mount behaves like a regular file on the host's ext4 for everyday tools (issue 9).

Each test runs the same calls (fallocate(1), lseek, cp, qemu-img, stat) on a file
in the mount and on a file in a host directory (tmp_path, ext4 here): the host
file system is the reference. Where virtfs differs by design (allocation in
segments, not blocks), the test says how.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from rig import run_vdctl, wait_for

MiB = 1 << 20
SEG = 4 * MiB  # the default segment size


def vd(m: Any, *args: str) -> Any:
    r = run_vdctl("--state-dir", str(m.state_dir), "--format", "json", *args)
    assert r.rc == 0, r.err
    return r.json()


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def falloc(path: Path, *args: str) -> str:
    """fallocate(1) on path: '' on success, else its error text."""
    r = run("fallocate", *args, str(path))
    return "" if r.returncode == 0 else r.stderr.strip()


def seq(m: Any) -> int:
    return int(vd(m, "status")["seq"])


def figures_agree(ctl: Any, mnt: Path) -> None:
    """stat, du and df in the mount agree with vdctl (every file closed): size, st_blocks
    (allocated bytes rounded up to 4 KiB) and du per disk; df's size and use = the pool's
    capacity and use."""
    rows = [r for r in vd(ctl, "disk", "ls") if not r.get("deleted")]
    assert sorted(os.listdir(mnt)) == sorted(r["name"] for r in rows)
    for r in rows:
        st = os.stat(mnt / r["name"])
        assert st.st_size == r["size"], r
        assert st.st_blocks * 512 == -(-r["allocated"] // 4096) * 4096, r
        du = run("du", "-B1", str(mnt / r["name"]))
        assert int(du.stdout.split()[0]) == st.st_blocks * 512
    status = vd(ctl, "status")
    fs = os.statvfs(mnt)
    assert fs.f_blocks * fs.f_frsize == status["capacity"] // 4096 * 4096
    assert (fs.f_blocks - fs.f_bfree) * fs.f_frsize == -(-status["used"] // 4096) * 4096
    df = run("df", "-B1", "--output=size,used", str(mnt)).stdout.split()
    assert [int(df[-2]), int(df[-1])] == [fs.f_blocks * fs.f_frsize,
                                          (fs.f_blocks - fs.f_bfree) * fs.f_frsize]


def test_fallocate_modes_like_ext4(embedded: Any, tmp_path: Path) -> None:
    """Every mode ext4 takes for a regular file, in sequence, on both files: same sizes,
    same contents; whole segments zeroed or punched go back to the pool; COLLAPSE and
    INSERT are refused (EOPNOTSUPP) in the mount, where ext4 takes them."""
    ours, host = embedded.path / "f", tmp_path / "host"
    data = os.urandom(12 * MiB)
    for p in (ours, host):
        p.write_bytes(data)
    steps = [
        ["-z", "-o", str(MiB), "-l", str(6 * MiB)],  # zero range inside
        ["-z", "-o", str(10 * MiB), "-l", str(8 * MiB)],  # zero range past the end: grows
        ["-z", "-n", "-o", str(16 * MiB), "-l", str(8 * MiB)],  # keep size: no growth
        ["-p", "-o", str(5 * MiB), "-l", str(MiB)],  # punch hole (keep size implied)
        ["-o", str(30 * MiB), "-l", str(2 * MiB)],  # preallocate: grows to 32 MiB
        ["-n", "-o", str(40 * MiB), "-l", str(MiB)],  # preallocate past the end, keep size
        ["-o", "0", "-l", "4096"],  # preallocate over data: changes nothing
        ["-z", "-o", "100", "-l", "5000"],  # unaligned zero range
    ]
    for args in steps:
        assert falloc(ours, *args) == "", args
        assert falloc(host, *args) == "", args
        assert ours.stat().st_size == host.stat().st_size, args
        assert ours.read_bytes() == host.read_bytes(), args
    # a zero range over whole segments frees them (on ext4 the blocks stay allocated)
    assert falloc(ours, "-z", "-o", str(2 * SEG), "-l", str(2 * SEG)) == ""
    info = vd(embedded, "disk", "info", "f")
    assert ours.stat().st_blocks * 512 == info["allocated"]
    rows = vd(embedded, "disk", "map", "f")["entries"]
    assert any(r["vstart"] <= 2 * SEG and r["vstart"] + r["length"] >= 4 * SEG
               and r["state"] == ["zero"] for r in rows), rows
    for flag in ("-c", "-i"):  # COLLAPSE_RANGE, INSERT_RANGE
        assert "not supported" in falloc(ours, flag, "-o", "0", "-l", str(SEG))
        assert falloc(host, flag, "-o", "0", "-l", str(SEG)) == ""
    figures_agree(embedded, embedded.path)
    assert vd(embedded, "check")["ok"]


def test_preallocation_reserves_thin_space(embedded: Any) -> None:
    """fallocate mode 0 and KEEP_SIZE on a thin disk map the range at the controller:
    st_blocks, `disk info` and `container ls` show it, and a later write there succeeds
    when the pool is full."""
    mnt = embedded.path
    used0 = sum(c["used"] for c in vd(embedded, "container", "ls"))
    assert falloc(mnt / "pre", "-l", str(64 * MiB)) == ""
    st = os.stat(mnt / "pre")
    assert st.st_size == 64 * MiB and st.st_blocks * 512 == 64 * MiB
    assert vd(embedded, "disk", "info", "pre")["allocated"] == 64 * MiB
    assert sum(c["used"] for c in vd(embedded, "container", "ls")) == used0 + 64 * MiB
    # KEEP_SIZE inside the file (a second file, sized first)
    subprocess.run(["truncate", "-s", str(32 * MiB), str(mnt / "keep")], check=True)
    assert falloc(mnt / "keep", "-n", "-o", str(8 * MiB), "-l", str(8 * MiB)) == ""
    st = os.stat(mnt / "keep")
    assert st.st_size == 32 * MiB and st.st_blocks * 512 == 8 * MiB
    # fill the pool, then write the preallocated ranges: no ENOSPC there
    free = sum(c["free"] for c in vd(embedded, "container", "ls"))
    vd(embedded, "disk", "create", "fill", "--size", str(free), "--thick")
    with pytest.raises(OSError) as ei, open(mnt / "other", "wb") as f:
        f.write(os.urandom(MiB))
        f.flush()
        os.fsync(f.fileno())
    assert ei.value.errno == errno.ENOSPC
    assert os.stat(mnt / "other").st_size == 0  # a failed append grows nothing
    assert vd(embedded, "disk", "info", "other")["size"] == 0
    blob = os.urandom(64 * MiB)
    with open(mnt / "pre", "r+b") as f:
        f.write(blob)
        os.fsync(f.fileno())
    with open(mnt / "keep", "r+b") as f:
        f.seek(8 * MiB)
        f.write(blob[: 8 * MiB])
        os.fsync(f.fileno())
    assert (mnt / "pre").read_bytes() == blob
    figures_agree(embedded, mnt)
    assert vd(embedded, "check")["ok"]


def test_seek_data_and_hole_from_the_table(embedded: Any, tmp_path: Path) -> None:
    """SEEK_DATA/SEEK_HOLE answer from the map (at segment granularity, where ext4
    answers per block); qemu-img map and cp --sparse=always read only the data."""
    ours, host = embedded.path / "sparse", tmp_path / "sparse"
    blk = os.urandom(4096)
    for p in (ours, host):
        subprocess.run(["truncate", "-s", "1G", str(p)], check=True)
        with open(p, "r+b") as f:
            f.seek(512 * MiB)
            f.write(blk)
    for p, data_end in ((host, 512 * MiB + 4096), (ours, 512 * MiB + SEG)):
        fd = os.open(p, os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_DATA) == 512 * MiB
            assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
            assert os.lseek(fd, 512 * MiB, os.SEEK_HOLE) == data_end
            assert os.lseek(fd, 512 * MiB + 100, os.SEEK_DATA) == 512 * MiB + 100
            for off in (600 * MiB, 1 << 30):
                with pytest.raises(OSError) as ei:
                    os.lseek(fd, off, os.SEEK_DATA)
                assert ei.value.errno == errno.ENXIO
        finally:
            os.close(fd)
    r = run("qemu-img", "map", "--output=json", "-f", "raw", str(ours))
    assert r.returncode == 0, r.stderr
    data = [(e["start"], e["length"]) for e in json.loads(r.stdout) if e["data"]]
    assert data == [(512 * MiB, SEG)]
    # cp --sparse=always reads only the data (strace counts the bytes read from the file)
    out = tmp_path / "copy"
    trace = tmp_path / "cp.strace"
    r = run("strace", "-f", "-e", "trace=read", "-o", str(trace), "cp", "--sparse=always",
            str(ours), str(out))
    assert r.returncode == 0, r.stderr
    read = sum(int(m) for m in re.findall(r"^\d+\s+read\(3,.*\)\s+=\s+(\d+)",
                                          trace.read_text(), re.M))
    assert read <= 2 * SEG, read
    # the copy equals host: same size, same bytes in the one data window, holes elsewhere
    # (reading 1 GiB of holes twice took 8 s)
    assert out.stat().st_size == host.stat().st_size
    assert out.stat().st_blocks * 512 <= SEG
    fd = os.open(out, os.O_RDONLY)
    try:
        start = os.lseek(fd, 0, os.SEEK_DATA)
        end = os.lseek(fd, start, os.SEEK_HOLE)
        assert 512 * MiB <= start and end <= 512 * MiB + SEG, (start, end)
        with pytest.raises(OSError):
            os.lseek(fd, end, os.SEEK_DATA)  # ENXIO: no data past it
        with open(host, "rb") as h:
            h.seek(512 * MiB)
            assert os.pread(fd, SEG, 512 * MiB) == h.read(SEG)
    finally:
        os.close(fd)
    figures_agree(embedded, embedded.path)


def test_appending_and_sequential_writes_are_few_records(embedded: Any,
                                                         tmp_path: Path) -> None:
    """cp into the mount grows the disk ahead in large steps (not a round trip and a
    journal record per write) and a sequential writer allocates several segments per
    fault; the size is exact in the mount at once and at the controller after close."""
    src = tmp_path / "img"
    src.write_bytes(os.urandom(64 * MiB + 12345))
    before = seq(embedded)
    r = run("cp", str(src), str(embedded.path / "img"))
    assert r.returncode == 0, r.stderr
    records = seq(embedded) - before
    assert records <= 30, records  # was one grow per 128 KiB write, plus a map per segment
    assert (embedded.path / "img").read_bytes() == src.read_bytes()
    info = vd(embedded, "disk", "info", "img")
    assert info["size"] == 64 * MiB + 12345 == os.stat(embedded.path / "img").st_size
    assert -(-info["allocated"] // 4096) * 4096 == os.stat(embedded.path / "img").st_blocks * 512
    # while open, the mount shows the exact size; fsync settles it at the controller
    with open(embedded.path / "grow", "wb") as f:
        f.write(b"x" * 5000)
        f.flush()
        assert os.fstat(f.fileno()).st_size == 5000
        assert os.stat(embedded.path / "grow").st_size == 5000
        os.fsync(f.fileno())
        assert vd(embedded, "disk", "info", "grow")["size"] == 5000
        f.write(b"y" * 5000)
    assert vd(embedded, "disk", "info", "grow")["size"] == 10000
    # a first sequential write of a sized thin disk: a record per several segments
    subprocess.run(["truncate", "-s", str(128 * MiB), str(embedded.path / "thin")],
                   check=True)
    before = seq(embedded)
    r = run("dd", "if=/dev/zero", f"of={embedded.path / 'thin'}", "bs=1M", "count=128",
            "conv=notrunc,fsync", "status=none")
    assert r.returncode == 0, r.stderr
    assert seq(embedded) - before <= 10  # was 32: one per 4 MiB segment
    figures_agree(embedded, embedded.path)
    assert vd(embedded, "check")["ok"]


def test_table_seek_zero_entries_are_holes() -> None:
    """DiskTable.seek: zero entries are holes; any other entry (invalid zero too) is data;
    the end of the disk is a hole; None (ENXIO) at or past the end or with no data after."""
    from controller.protocol import INVALID, ZERO
    from virtfs.mapcache import DiskTable

    t = DiskTable("d", 100 * SEG, 1, [[0, SEG, -1, 0, ZERO], [SEG, SEG, 1, 0, 0],
                                      [2 * SEG, 8 * SEG, -1, 0, ZERO],
                                      [10 * SEG, SEG, -1, 0, ZERO | INVALID],
                                      [11 * SEG, 89 * SEG, -1, 0, ZERO]])
    assert t.seek(0, data=True) == SEG
    assert t.seek(0, data=False) == 0
    assert t.seek(SEG + 5, data=True) == SEG + 5
    assert t.seek(SEG + 5, data=False) == 2 * SEG
    assert t.seek(2 * SEG, data=True) == 10 * SEG  # restricted: may be data
    assert t.seek(11 * SEG, data=True) is None
    assert t.seek(11 * SEG, data=False) == 11 * SEG
    assert t.seek(100 * SEG, data=False) is None
    full = DiskTable("f", 3 * SEG, 1, [[0, 3 * SEG, 1, 0, 0]])
    assert full.seek(SEG, data=False) == 3 * SEG  # the end of the file is a hole


def test_times_move_like_ext4_and_agree_everywhere(controller: Any, mount_factory: Any,
                                                   tmp_path: Path) -> None:
    """mtime and ctime move on every write and size change (as on ext4), touch sets
    mtime, and once the file is closed a second mount and `vdctl disk info` agree;
    `rsync -a` from the mount then sees an in-place change (same size) and copies it."""
    r = controller.vdctl("container", "add", "c1", str(tmp_path / "c1.img"), "--size", "1G")
    assert r.rc == 0, r.err
    a, b = (mount_factory(n, state_dir=controller.state_dir,
                          controller=f"unix:{controller.sock}") for n in ("a", "b"))
    ours, host = a.path / "t", tmp_path / "host-t"
    for p in (ours, host):
        p.write_bytes(os.urandom(MiB))
    old = {p: os.stat(p) for p in (ours, host)}
    time.sleep(0.05)
    for p in (ours, host):
        with open(p, "r+b") as f:  # in place, same size
            f.seek(4096)
            f.write(b"changed")
    for p in (ours, host):
        st = os.stat(p)
        assert st.st_mtime_ns > old[p].st_mtime_ns and st.st_ctime_ns > old[p].st_ctime_ns
    def agree() -> bool:
        st = os.stat(b.path / "t")
        info = vd(controller, "disk", "info", "t")
        return (st.st_mtime_ns == os.stat(ours).st_mtime_ns
                and abs(info["mtime"] - os.stat(ours).st_mtime) < 1e-3)
    wait_for(agree, 5, "mtime the same in both mounts and vdctl")
    # a size change moves them too
    before = os.stat(ours).st_mtime_ns
    time.sleep(0.05)
    os.truncate(ours, 2 * MiB)
    assert os.stat(ours).st_mtime_ns > before
    # touch -d sets mtime exactly, here, there and at the controller
    for p in (ours, host):
        run("touch", "-d", "2020-02-02 02:02:02", str(p))
    want = os.stat(host).st_mtime_ns
    assert os.stat(ours).st_mtime_ns == want
    assert vd(controller, "disk", "info", "t")["mtime"] * 1e9 == pytest.approx(want, abs=1e3)
    wait_for(lambda: os.stat(b.path / "t").st_mtime_ns == want, 5, "touch seen by mount b")
    # rsync -a backup, an in-place change of the same size, rsync -a again: copied
    backup = tmp_path / "backup"
    backup.mkdir()
    assert run("rsync", "-a", str(ours), str(backup) + "/").returncode == 0
    time.sleep(1.1)  # rsync compares whole seconds
    with open(ours, "r+b") as f:
        f.write(b"again")
    assert run("rsync", "-a", str(ours), str(backup) + "/").returncode == 0
    assert (backup / "t").read_bytes() == ours.read_bytes()
    # rsync -a into the mount keeps the source's mtime: the next quick check skips it
    assert run("rsync", "-a", str(host), str(a.path) + "/").returncode == 0
    assert os.stat(a.path / "host-t").st_mtime_ns // 10**9 == want // 10**9
    for m in (a, b):
        figures_agree(controller, m.path)


def _two_mounts(controller: Any, mount_factory: Any, tmp_path: Path) -> tuple[Any, Any]:
    r = controller.vdctl("container", "add", "c1", str(tmp_path / "c1.img"), "--size", "1G")
    assert r.rc == 0, r.err
    a, b = (mount_factory(n, state_dir=controller.state_dir,
                          controller=f"unix:{controller.sock}") for n in ("a", "b"))
    return a, b


HEARTBEAT = 5.0  # seconds: a heartbeat is a third of the 10 s lease, plus slack


def test_namespace_changes_reach_every_mount(controller: Any, mount_factory: Any,
                                            tmp_path: Path) -> None:
    """create, rename and unlink through one mount: visible there at once, and through
    the other within a heartbeat; a refused rename changes nothing anywhere."""
    a, b = _two_mounts(controller, mount_factory, tmp_path)
    (a.path / "one").write_bytes(b"1" * 5000)
    wait_for(lambda: "one" in os.listdir(b.path), HEARTBEAT, "create seen by b")
    assert (b.path / "one").read_bytes() == b"1" * 5000
    os.rename(a.path / "one", a.path / "two")
    assert (a.path / "two").read_bytes() == b"1" * 5000  # at once, here
    assert not (a.path / "one").exists()
    wait_for(lambda: os.listdir(b.path) == ["two"], HEARTBEAT, "rename seen by b")
    assert (b.path / "two").read_bytes() == b"1" * 5000
    assert not (b.path / "one").exists()
    # a rename over a disk open in the other mount is refused and changes nothing
    (a.path / "three").write_bytes(b"3" * 4096)
    wait_for(lambda: (b.path / "three").exists(), HEARTBEAT, "create seen by b")
    with open(b.path / "three", "rb"):
        with pytest.raises(OSError) as ei:
            os.rename(a.path / "two", a.path / "three")
        assert ei.value.errno == errno.EBUSY
        for m in (a, b):
            assert sorted(os.listdir(m.path)) == ["three", "two"]
            assert (m.path / "two").read_bytes() == b"1" * 5000
            assert (m.path / "three").read_bytes() == b"3" * 4096
        assert sorted(r["name"] for r in vd(controller, "disk", "ls")) == ["three", "two"]
    os.unlink(a.path / "two")
    assert os.listdir(a.path) == ["three"]
    wait_for(lambda: os.listdir(b.path) == ["three"], HEARTBEAT, "unlink seen by b")
    for m in (a, b):
        figures_agree(controller, m.path)
    assert vd(controller, "check")["ok"]


def test_unlinked_open_disk_frees_its_name_at_once(controller: Any, mount_factory: Any,
                                                   tmp_path: Path) -> None:
    """rm of a file open in two mounts: its name is free at once (a new file may take
    it, as on ext4), both handles keep the old data, `vdctl disk ls` marks it, and it
    is removed (its space freed) when the last handle anywhere closes."""
    a, b = _two_mounts(controller, mount_factory, tmp_path)
    old = os.urandom(3 * MiB)
    (a.path / "x").write_bytes(old)
    wait_for(lambda: (b.path / "x").exists(), HEARTBEAT, "create seen by b")
    used = sum(c["used"] for c in vd(controller, "container", "ls"))
    fa = open(a.path / "x", "rb")  # noqa: SIM115
    fb = open(b.path / "x", "rb")  # noqa: SIM115
    try:
        os.unlink(a.path / "x")
        assert os.listdir(a.path) == []
        (a.path / "x").write_bytes(b"new")  # the name is free at once
        assert (a.path / "x").read_bytes() == b"new"
        wait_for(lambda: (b.path / "x").exists() and (b.path / "x").read_bytes() == b"new",
                 HEARTBEAT, "the new x seen by b")
        assert fa.read() == old and fb.read() == old
        rows = vd(controller, "disk", "ls")
        assert sorted((r["deleted"] or "", r["name"] == "x") for r in rows) == [
            ("", True), ("x", False)]
        table = run_vdctl("--state-dir", str(controller.state_dir), "disk", "ls").out
        assert "x (deleted, still open)" in table
        for m in (a, b):
            assert os.listdir(m.path) == ["x"]
    finally:
        fa.close()
    time.sleep(0.5)
    assert len(vd(controller, "disk", "ls")) == 2  # b still has it open
    fb.close()
    wait_for(lambda: len(vd(controller, "disk", "ls")) == 1, 10, "removal after the last close")
    assert sum(c["used"] for c in vd(controller, "container", "ls")) == used - 3 * MiB + 4096
    for m in (a, b):
        figures_agree(controller, m.path)
    assert vd(controller, "check")["ok"]


def test_unlink_of_a_disk_open_only_in_another_mount(controller: Any, mount_factory: Any,
                                                     tmp_path: Path) -> None:
    """rm in mount a of a file that only mount b has open: not EBUSY (ext4 never
    refuses an unlink); the name goes everywhere at once, b's handle keeps reading and
    writing the data, and it is removed when b closes it."""
    a, b = _two_mounts(controller, mount_factory, tmp_path)
    old = os.urandom(2 * MiB)
    (a.path / "x").write_bytes(old)
    wait_for(lambda: (b.path / "x").exists(), HEARTBEAT, "create seen by b")
    used = sum(c["used"] for c in vd(controller, "container", "ls"))
    fb = open(b.path / "x", "r+b")  # noqa: SIM115
    try:
        subprocess.run(["rm", str(a.path / "x")], check=True, capture_output=True)
        assert os.listdir(a.path) == []
        wait_for(lambda: os.listdir(b.path) == [], HEARTBEAT, "unlink seen by b")
        [row] = vd(controller, "disk", "ls")
        assert row["deleted"] == "x"
        fb.seek(MiB)
        fb.write(b"still here")
        fb.flush()
        fb.seek(0)
        assert fb.read() == old[:MiB] + b"still here" + old[MiB + 10:]
        (a.path / "x").write_bytes(b"new")  # the name is free at once
        assert (a.path / "x").read_bytes() == b"new"
    finally:
        fb.close()
    wait_for(lambda: len(vd(controller, "disk", "ls")) == 1, 10, "removal after the last close")
    assert sum(c["used"] for c in vd(controller, "container", "ls")) == used - 2 * MiB + 4096
    assert vd(controller, "check")["ok"]


def test_unlinked_disk_whose_last_agent_died_goes_after_its_lease(mount_factory: Any,
                                                                  tmp_path: Path) -> None:
    """rm in mount a of a file only mount b has open, then b's agent is killed (kill -9)
    instead of closing it: the controller removes the disk (its space freed) once b's
    lease has run out, not before, and not while b lives."""
    from rig import ControllerProc
    c = ControllerProc(tmp_path / "state", tmp_path / "controller.log")
    c.start(["--lease", "2"])
    try:
        assert c.vdctl("container", "add", "c1", str(tmp_path / "c1.img"),
                       "--size", "1G").rc == 0
        a, b = (mount_factory(n, controller=c.addr) for n in ("a", "b"))
        (a.path / "x").write_bytes(os.urandom(2 * MiB))
        used = sum(r["used"] for r in vd(c, "container", "ls"))
        wait_for(lambda: (b.path / "x").exists(), 2, "create seen by b")
        fb = open(b.path / "x", "rb")  # noqa: SIM115
        try:
            os.unlink(a.path / "x")
            time.sleep(3 * 2)  # three leases: b lives and has it open, so it stays
            [row] = vd(c, "disk", "ls")
            assert row["deleted"] == "x", row
            b.kill9()
            t0 = time.monotonic()
            wait_for(lambda: vd(c, "disk", "ls") == [], 15, "removal after b's lease")
            assert time.monotonic() - t0 >= 1.0  # not at once: b's lease first
        finally:
            try:
                fb.close()
            except OSError:
                pass  # b's mount is gone
        assert sum(r["used"] for r in vd(c, "container", "ls")) == used - 2 * MiB
        assert vd(c, "check")["ok"]
        assert "no agent has it open any more; removing it" in c.log_path.read_text()
    finally:
        c.stop()


def test_fallocate_while_grown_ahead(embedded: Any, tmp_path: Path) -> None:
    """fallocate on a file being appended (its size grown ahead at the controller): the
    size and content are still exactly the host file's."""
    ours, host = embedded.path / "g", tmp_path / "g"
    data = os.urandom(3 * MiB + 5)
    fds = [os.open(p, os.O_WRONLY | os.O_CREAT, 0o644) for p in (ours, host)]
    try:
        for fd, p in zip(fds, (ours, host), strict=True):
            os.write(fd, data)
            assert falloc(p, "-z", "-o", str(3 * MiB), "-l", str(2 * MiB)) == ""
            assert falloc(p, "-o", str(6 * MiB), "-l", "100") == ""
            assert falloc(p, "-n", "-o", str(7 * MiB), "-l", str(MiB)) == ""
            os.write(fd, b"tail")
            assert os.fstat(fd).st_size == 6 * MiB + 100
    finally:
        for fd in fds:
            os.close(fd)
    assert ours.read_bytes() == host.read_bytes()
    assert vd(embedded, "disk", "info", "g")["size"] == 6 * MiB + 100
    figures_agree(embedded, embedded.path)


def test_times_and_deleted_names_replay_and_checkpoint() -> None:
    """disk.times and an unlink's rename to a deleted name: replay equals live, and both
    checkpoint forms (format 1, format 2) keep them; a checkpoint without times loads."""
    from stateimage import format1, image

    from controller.checkpoint import Snapshot, from_format1, from_parts
    from controller.protocol import deleted_name, former_name
    from controller.records import ContainerAdd, DiskCreate, DiskRename, DiskTimes
    from controller.state import State

    recs = [ContainerAdd("c", 1, "/dev/null/c", 64 * MiB, True),
            DiskCreate("x", MiB, SEG, False, None, 1, 1.0, []),
            DiskTimes("x", 1234.5, 2345.25),
            DiskRename("x", deleted_name(1, "x")),
            DiskCreate("x", 0, SEG, False, None, 1, 2.0, [])]
    live, replay = State(), State()
    for r in recs:
        live.apply(r)
        replay.apply_wire(r.to_wire())
    gone = live.disks[deleted_name(1, "x")]
    assert (gone.mtime, gone.stime) == (1234.5, 2345.25)
    info = gone.to_dict(live.luns)
    assert info["deleted"] == "x" and info["mtime"] == 1234.5 and info["changed"] == 2345.25
    assert live.disks["x"].to_dict(live.luns)["deleted"] is None
    assert live.disks["x"].to_dict(live.luns)["mtime"] == 2.0  # never set: creation time
    assert former_name("x") is None and former_name(deleted_name(3, "a/b")) == "a/b"
    for s in (replay, from_format1(format1(live))):
        assert image(s) == image(live)
    snap = Snapshot(live)
    try:
        assert image(from_parts(list(snap.parts()))) == image(live)
    finally:
        snap.release()
    w = format1(live)
    for dw in w["disks"]:
        dw.pop("mtime", None)
        dw.pop("stime", None)
    old = from_format1(w)
    assert old.disks[deleted_name(1, "x")].mtime == 0.0
