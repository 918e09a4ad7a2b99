"""Snapshots, clones and rollback with fine-grained copy-on-write (issue 8), on real
mounts. A snapshot's content is read through the mount (NAME@SNAP) and through a
clone of it; qemu-img compare, fio --verify, e2fsck and a sequence-number writer
are the oracles."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from rig import (
    FAULTS_ENV,
    FIO_VERIFY,
    SEG,
    ControllerProc,
    add_container,
    agent,
    check_clean,
    dwrite,
    hold_copier,
    loop_device,
    open_direct,
    run,
    vd,
    wait_for,
)

B = 4096


def used(c: ControllerProc) -> dict[str, int]:
    return {r["name"]: r["used"] for r in vd(c, "container", "ls", "--format", "json").json()}


def snaps(c: ControllerProc, disk: str) -> list[dict[str, Any]]:
    return vd(c, "snap", "ls", disk, "--format", "json").json()


def fill(path: Path, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.write(data)
        os.fsync(f.fileno())


def compare(a: Path, b: Path) -> None:
    r = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)], check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_snapshot_is_isolated_from_later_writes(controller, mount_factory, tmp_path):
    add_container(controller, "c1", tmp_path / "c1.img", "1G")
    vd(controller, "disk", "create", "d", "--size", "32M")
    m = agent(mount_factory, controller)
    base = os.urandom(32 << 20)
    fill(m.path / "d", base)
    copy = tmp_path / "at-snapshot.raw"
    copy.write_bytes(base)
    t0 = time.monotonic()
    vd(controller, "snap", "create", "d@s1")
    assert time.monotonic() - t0 < 5
    model = bytearray(base)
    fd = open_direct(m.path / "d")
    try:  # O_DIRECT, block-aligned, into several segments
        for k in range(0, 8, 3):
            data = os.urandom(2 * B)
            dwrite(fd, k * SEG + 5 * B, data)
            model[k * SEG + 5 * B : k * SEG + 7 * B] = data
    finally:
        os.close(fd)
    with open(m.path / "d", "r+b") as f:  # buffered, sub-block, across a segment edge
        f.seek(2 * SEG - 100)
        f.write(b"\xee" * 300)
        os.fsync(f.fileno())
    model[2 * SEG - 100 : 2 * SEG + 200] = b"\xee" * 300
    assert (m.path / "d").read_bytes() == bytes(model)
    # the snapshot is a read-only file in every mount
    m2 = agent(mount_factory, controller, "m2")
    for mm in (m, m2):
        snap = mm.path / "d@s1"
        wait_for(snap.exists, 10, "the snapshot in the mount")
        st = snap.stat()
        assert st.st_mode & 0o777 == 0o444 and st.st_size == 32 << 20
        compare(snap, copy)
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDWR | os.O_TRUNC):
        with pytest.raises(OSError) as ei:
            os.open(m.path / "d@s1", flags)
        assert ei.value.errno == errno.EROFS
    for op in (lambda: os.unlink(m.path / "d@s1"),
               lambda: os.rename(m.path / "d@s1", m.path / "x"),
               lambda: os.truncate(m.path / "d@s1", 0)):
        with pytest.raises(OSError) as ei:
            op()
        assert ei.value.errno in (errno.EPERM, errno.EROFS, errno.EACCES)
    vd(controller, "disk", "clone", "d@s1", "c")
    assert vd(controller, "disk", "info", "c", "--format", "json").json()["origin"] == "d@s1"
    wait_for(lambda: (m.path / "c").exists(), 10, "the clone in the mount")
    compare(m.path / "c", copy)
    # the oracle can fail: the disk differs from the snapshot now
    r = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(m.path / "d"), str(copy)],
            check=False)
    assert r.returncode == 1
    s1 = snaps(controller, "d")[0]
    assert s1["name"] == "d@s1" and s1["size"] == 32 << 20 and s1["clones"] == ["c"]
    check_clean(controller)


def test_clone_writes_leave_disk_and_snapshot_alone_and_persist(controller, mount_factory,
                                                                 tmp_path):
    add_container(controller, "c1", tmp_path / "c1.img", "1G")
    vd(controller, "disk", "create", "d", "--size", "16M")
    m = agent(mount_factory, controller)
    base = os.urandom(16 << 20)
    fill(m.path / "d", base)
    vd(controller, "snap", "create", "d@s")
    vd(controller, "disk", "clone", "d@s", "c")
    wait_for(lambda: (m.path / "c").exists(), 10, "the clone")
    mine = bytearray(base)
    with open(m.path / "c", "r+b") as f:
        for k in range(4):
            f.seek(k * SEG + 1000)
            f.write(b"clone" * 100)
            mine[k * SEG + 1000 : k * SEG + 1500] = b"clone" * 100
        os.fsync(f.fileno())
    assert (m.path / "d").read_bytes() == base
    vd(controller, "disk", "clone", "d@s", "c2")
    wait_for(lambda: (m.path / "c2").exists(), 10, "the second clone")
    assert (m.path / "c2").read_bytes() == base  # the snapshot is unchanged
    m.unmount()
    m2 = agent(mount_factory, controller, "again")
    assert (m2.path / "c").read_bytes() == bytes(mine)
    check_clean(controller)


def test_rm_frees_exactly_the_unshared_space_and_rollback(controller, mount_factory,
                                                          tmp_path):
    add_container(controller, "c1", tmp_path / "c1.img", "1G")
    vd(controller, "disk", "create", "d", "--size", "32M")
    m = agent(mount_factory, controller)
    base = os.urandom(32 << 20)
    fill(m.path / "d", base)
    assert used(controller)["c1"] == 32 << 20
    vd(controller, "snap", "create", "d@s")
    assert used(controller)["c1"] == 32 << 20  # nothing copied yet
    with open(m.path / "d", "r+b") as f:  # overwrite 3 segments: copy-on-write
        for k in (1, 4, 7):
            f.seek(k * SEG)
            f.write(os.urandom(SEG))
        os.fsync(f.fileno())
    wait_for(lambda: used(controller)["c1"] == (32 << 20) + 3 * SEG, 10,
             "copy-on-write to settle")
    assert snaps(controller, "d")[0]["held"] == 3 * SEG
    # a disk with snapshots cannot be removed, and says why
    m.unmount()
    r = controller.vdctl("disk", "rm", "d")
    assert r.rc == 1 and "has snapshots: d@s" in r.err
    # rollback: the disk reads the snapshot's bytes again
    vd(controller, "snap", "rollback", "d@s")
    assert used(controller)["c1"] == 32 << 20  # what only the disk held went
    m = agent(mount_factory, controller, "m2")
    assert (m.path / "d").read_bytes() == base
    with open(m.path / "d", "r+b") as f:
        f.seek(5 * SEG)
        f.write(os.urandom(SEG))
        os.fsync(f.fileno())
    wait_for(lambda: used(controller)["c1"] == (32 << 20) + SEG, 10,
             "copy-on-write to settle")
    vd(controller, "snap", "rm", "d@s")
    assert used(controller)["c1"] == 32 << 20  # exactly the snapshot's own segment freed
    check_clean(controller)


def test_disk_rm_says_what_it_freed(controller, mount_factory, tmp_path):
    """`disk rm` says the storage it gave back, not the disk's allocated figure: 0 for
    an untouched clone (all it maps is its origin's), a segment for a clone with one
    segment copied on write; the container's used figure agrees."""
    add_container(controller, "c1", tmp_path / "c1.img", "1G")
    vd(controller, "disk", "create", "d", "--size", "32M")
    m = agent(mount_factory, controller)
    fill(m.path / "d", os.urandom(32 << 20))
    vd(controller, "snap", "create", "d@s")
    vd(controller, "disk", "clone", "d@s", "c")
    r = vd(controller, "disk", "rm", "c")
    assert r.err.strip() == "disk c removed (0B freed)"
    assert used(controller)["c1"] == 32 << 20
    vd(controller, "disk", "clone", "d@s", "c")
    fill(m.path / "c", os.urandom(B))  # copy-on-write of its first segment
    wait_for(lambda: used(controller)["c1"] == (32 << 20) + SEG, 10, "copy-on-write")
    wait_for(lambda: controller.vdctl("agent", "ls", "--format", "json").json()[0]["disks"]
             == [], 10, "the clone's close")
    r = vd(controller, "disk", "rm", "c", "--format", "json")
    assert r.json()["freed"] == SEG and r.json()["allocated"] == 32 << 20
    assert r.err.strip() == f"disk c removed ({SEG >> 20}M freed)"
    assert used(controller)["c1"] == 32 << 20
    check_clean(controller)


def _seq_writer(path: Path, nblocks: int, stop: threading.Event, errors: list[str],
                done: list[int]) -> None:
    """Write blocks 0..nblocks-1 over and over, block i of pass p holding the global
    sequence number p * nblocks + i (O_DIRECT, each write complete before the next).
    done[0] is the number of writes completed so far."""
    fd = open_direct(path)
    seq = 0
    try:
        while not stop.is_set():
            dwrite(fd, (seq % nblocks) * B, struct.pack("<Q", seq) * (B // 8))
            seq += 1
            done[0] = seq
    except OSError as e:
        errors.append(repr(e))
    finally:
        os.close(fd)


def _consistent(image: bytes, nblocks: int) -> None:
    """A point-in-time image of the sequential writer: each block holds the last write
    before some instant, so the sequence numbers along the blocks rise by one, with
    at most one step back (where the writer was)."""
    vals = [struct.unpack_from("<Q", image, i * B)[0] for i in range(nblocks)]
    for i in range(nblocks):
        assert image[i * B : (i + 1) * B] == struct.pack("<Q", vals[i]) * (B // 8), i
    drops = [i for i in range(1, nblocks) if vals[i] != vals[i - 1] + 1]
    assert len(drops) <= 1, drops[:5]
    if drops:
        i = drops[0]
        assert vals[i] + nblocks == vals[i - 1] + 1, (vals[i - 1], vals[i])


def test_snapshots_under_load_are_points_in_time(controller, mount_factory, tmp_path):
    """fio --verify random writes on one disk and a sequence-number writer on another,
    while three snapshots of each are taken: fio verifies, and each snapshot of the
    sequence disk is one instant of its writer."""
    add_container(controller, "c1", tmp_path / "c1.img", "2G")
    vd(controller, "disk", "create", "f", "--size", "128M")
    vd(controller, "disk", "create", "q", "--size", "8M")
    m = agent(mount_factory, controller)
    nblocks = (8 << 20) // B
    work = tmp_path / "fio"
    work.mkdir()
    p = subprocess.Popen(["fio", "--name=v", f"--filename={m.path / 'f'}", *FIO_VERIFY,
                          "--do_verify=1", "--randseed=5", "--direct=1", "--size=128M"],
                         cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop, errors, done = threading.Event(), [], [0]
    w = threading.Thread(target=_seq_writer, args=(m.path / "q", nblocks, stop, errors, done))
    w.start()
    try:
        # the oracle needs every block written once: blocks of a first pass that the
        # writer has not reached yet read as zeros, which no instant of a full pass shows
        wait_for(lambda: done[0] >= nblocks or bool(errors), 120, "the writer's first pass")
        for k in range(3):
            time.sleep(0.7)
            vd(controller, "snap", "create", f"f@s{k}")
            vd(controller, "snap", "create", f"q@s{k}")
    finally:
        stop.set()
        w.join(60)
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 0, out[-3000:]
    assert not errors, errors
    for k in range(3):
        vd(controller, "disk", "clone", f"q@s{k}", f"q{k}")
        wait_for(lambda k=k: (m.path / f"q{k}").exists(), 10, "the clone")
        _consistent((m.path / f"q{k}").read_bytes(), nblocks)
    # and the oracle can fail: an image that mixes two instants is caught. The later
    # instant is q0's own image one whole pass on (every block rewritten once more), so
    # the two always differ, even when a loaded machine stalled the writer between the
    # snapshots (q0 and q2 were then the same image, and mixing them proved nothing)
    a = (m.path / "q0").read_bytes()
    later = b"".join(struct.pack("<Q", struct.unpack_from("<Q", a, i * B)[0] + nblocks)
                     * (B // 8) for i in range(nblocks))
    _consistent(later, nblocks)
    cut = nblocks // 3  # not at q0's own step back, where the mix would join seamlessly
    if struct.unpack_from("<Q", a, cut * B)[0] != struct.unpack_from("<Q", a, (cut - 1) * B)[0] + 1:
        cut += 1
    with pytest.raises(AssertionError):
        _consistent(a[: cut * B] + later[cut * B :], nblocks)
    check_clean(controller)


def test_ext4_frozen_snapshot_is_clean(controller, mount_factory, tmp_path):
    add_container(controller, "c1", tmp_path / "c1.img", "1G")
    vd(controller, "disk", "create", "fs", "--size", "256M")
    m = agent(mount_factory, controller)
    run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", str(m.path / "fs")])
    mnt = tmp_path / "ext4"
    mnt.mkdir()
    with loop_device(m.path / "fs") as loop:
        run(["mount", loop, str(mnt)])
        try:
            for i in range(40):
                (mnt / f"f{i}").write_bytes(os.urandom(64 << 10))
            writer = subprocess.Popen(["dd", "if=/dev/urandom", f"of={mnt / 'big'}", "bs=1M",
                                       "count=64", "conv=fsync"], stderr=subprocess.DEVNULL)
            time.sleep(0.3)
            run(["fsfreeze", "-f", str(mnt)])
            try:
                vd(controller, "snap", "create", "fs@frozen")
            finally:
                run(["fsfreeze", "-u", str(mnt)])
            writer.wait(120)
        finally:
            run(["umount", str(mnt)])
    vd(controller, "disk", "clone", "fs@frozen", "fsc")
    wait_for(lambda: (m.path / "fsc").exists(), 10, "the clone")
    run(["e2fsck", "-fn", str(m.path / "fsc")])
    run(["e2fsck", "-fn", str(m.path / "fs")])


def test_controller_kill9_mid_copy_on_write(tmp_path, monkeypatch, mount_factory):
    """kill -9 of the controller while copy-on-writes are half done (copier held): after
    a restart they finish; the snapshot and the disk both read back right."""
    hold = tmp_path / "hold"
    hold.touch()
    monkeypatch.setenv(FAULTS_ENV, hold_copier(hold))
    c = ControllerProc(tmp_path / "state", tmp_path / "controller.log")
    c.start(["--lease", "3"])
    try:
        add_container(c, "c1", tmp_path / "c1.img", "1G")
        vd(c, "disk", "create", "d", "--size", "32M")
        m = agent(mount_factory, c)
        base = os.urandom(32 << 20)
        fill(m.path / "d", base)
        vd(c, "snap", "create", "d@s")
        model = bytearray(base)
        fd = open_direct(m.path / "d")
        try:
            for k in range(8):
                data = os.urandom(B)
                dwrite(fd, k * SEG + 7 * B, data)
                model[k * SEG + 7 * B : k * SEG + 8 * B] = data
        finally:
            os.close(fd)
        rows = vd(c, "disk", "map", "d", "--format", "json").json()["entries"]
        assert sum(1 for e in rows if e["state"] == ["nowrite"]) >= 8  # half done
        c.kill()
        hold.unlink()
        monkeypatch.delenv(FAULTS_ENV)
        c.start(["--lease", "3"])
        wait_for(lambda: all(e["state"] == ["valid"] for e in vd(
            c, "disk", "map", "d", "--format", "json").json()["entries"]
            if e["vstart"] < 8 * SEG), 30, "the copies to finish")
        assert (m.path / "d").read_bytes() == bytes(model)
        vd(c, "disk", "clone", "d@s", "old")
        wait_for(lambda: (m.path / "old").exists(), 10, "the clone")
        assert (m.path / "old").read_bytes() == base
        check_clean(c)
    finally:
        c.stop()


def test_snapshot_bad_input(controller, mount_factory, tmp_path):
    add_container(controller, "c1", tmp_path / "c1.img", "256M")
    vd(controller, "disk", "create", "d", "--size", "8M")
    vd(controller, "disk", "create", "other", "--size", "8M")
    vd(controller, "snap", "create", "d@s")
    before = vd(controller, "check", "--format", "json").json()
    for args, msg in [
        (["snap", "create", "nope@s"], "no such disk"),
        (["snap", "create", "d@s"], "already exists"),
        (["snap", "create", "d@s@t"], "DISK@SNAP"),
        (["snap", "create", "d"], "DISK@SNAP"),
        (["snap", "create", "d@"], "snapshot name"),
        (["snap", "rm", "d@nope"], "no such snapshot"),
        (["snap", "rollback", "d@nope"], "no such snapshot"),
        (["disk", "clone", "d@s", "other"], "already exists"),
        (["disk", "clone", "d@nope", "x"], "no such snapshot"),
        (["disk", "rm", "d"], "has snapshots"),
        (["snap", "ls", "nope"], "no such disk"),
    ]:
        r = controller.vdctl(*args)
        assert r.rc == 1 and msg in r.err, (args, r.err)
        assert len(r.err.strip().splitlines()) == 1, r.err
    assert vd(controller, "check", "--format", "json").json() == before
