"""The data path through a real mount, with real client tools as oracles."""

from __future__ import annotations

import errno
import os
import signal
import subprocess

import pytest
from rig import (
    BLOCK,
    FAULTS_ENV,
    FIO_VERIFY,
    add_container,
    agent,
    dread,
    dwrite,
    fio,
    loop_device,
    open_direct,
    read_direct,
    run,
    run_vdctl,
    wait_for,
)

from controller.protocol import LABEL_BYTES


def vd(m, *args):
    r = run_vdctl("--state-dir", str(m.state_dir), *args)
    assert r.rc == 0, r.err
    return r


def disk_info(m, name):
    return vd(m, "disk", "info", name, "--format", "json").json()


@pytest.mark.parametrize(("direct", "fast"), [("0", "1"), ("1", "1"), ("1", "0"), ("1", "c")],
                         ids=["buffered", "direct", "direct-general-path", "direct-c-path"])
def test_fio_verify_randwrite_thin(mount_factory, direct, fast):
    """fast "0": every request through the general data path (VIRTFS_FASTPATH=0); "c":
    the C readers on (VIRTFS_FAST_THREADS=2, virtfs/cfast.py)."""
    env = ({"VIRTFS_FAST_THREADS": "2"} if fast == "c"
           else {"VIRTFS_FASTPATH": fast, "VIRTFS_FAST_THREADS": "0"})
    m = mount_factory("mnt", args=["--default-container-size", "4G"], env=env)
    vd(m, "disk", "create", "d", "--size", "96M")
    fio(m.path / "d", "--size=96M", "--do_verify=1", f"--direct={direct}", *FIO_VERIFY)
    # the disk was thin: fio's writes allocated it, and the table says so
    assert disk_info(m, "d")["allocated"] == 96 << 20


def test_fio_verify_catches_corruption(embedded, tmp_path):
    """The oracle can fail: flip data in the container behind fio's back."""
    vd(embedded, "disk", "create", "d", "--size", "8M")
    base = ["--size=8M", "--bs=4k", "--rw=write", "--ioengine=psync", "--verify=crc32c",
            "--verify_fatal=1", "--fallocate=none", "--direct=1"]
    fio(embedded.path / "d", "--do_verify=0", *base)
    m = vd(embedded, "disk", "map", "d", "--format", "json").json()
    e = m["entries"][0]
    container = tmp_path / "state" / "containers" / "default.img"
    with open(container, "r+b") as f:
        f.seek(e["offset"] + 4096 * 3 + 100)
        f.write(b"\xff" * 16)
    r = fio(embedded.path / "d", "--verify_only", *base, check=False)
    assert r.returncode != 0 and "verify" in (r.stdout + r.stderr).lower()


def test_ext4_on_loop(embedded, tmp_path):
    img = embedded.path / "fs"
    run(["truncate", "-s", "512M", str(img)])
    run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", str(img)])
    run(["e2fsck", "-fn", str(img)])
    mnt = tmp_path / "ext4"
    mnt.mkdir()
    with loop_device(img) as loop:
        run(["mount", loop, str(mnt)])
        try:
            for i in range(8):
                with open(mnt / f"f{i}", "wb") as f:
                    f.write(os.urandom(8 << 20))
            run(["sync"])
        finally:
            run(["umount", str(mnt)])
    run(["e2fsck", "-fn", str(img)])
    assert disk_info(embedded, "fs")["allocated"] >= 64 << 20


def test_qemu_img_convert_compare(embedded, tmp_path):
    vd(embedded, "disk", "create", "d", "--size", "64M")
    with open(embedded.path / "d", "r+b") as f:
        for off in (0, 5 << 20, 33 << 20, (64 << 20) - 4096):
            f.seek(off)
            f.write(os.urandom(4096))
    out = tmp_path / "out.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", str(embedded.path / "d"), str(out)])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(embedded.path / "d"), str(out)])
    # and the compare can fail
    with open(out, "r+b") as f:
        f.seek(5 << 20)
        f.write(b"x")
    r = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(embedded.path / "d"),
             str(out)], check=False)
    assert r.returncode == 1
    # import: qemu-img convert into the mount creates a disk
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", str(out), str(embedded.path / "imp")])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(out), str(embedded.path / "imp")])


def test_holes_read_zero_and_discard_frees(embedded):
    vd(embedded, "disk", "create", "d", "--size", "64M")
    with open(embedded.path / "d", "rb") as f:
        assert f.read(1 << 20) == bytes(1 << 20)
        f.seek(40 << 20)
        assert f.read(4096) == bytes(4096)
    assert disk_info(embedded, "d")["allocated"] == 0
    data = os.urandom(16 << 20)
    with open(embedded.path / "d", "r+b") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    assert disk_info(embedded, "d")["allocated"] == 16 << 20
    used = vd(embedded, "container", "ls", "--format", "json").json()[0]["used"]
    # punch 4M..12M (two whole 4 MiB segments) and 13M..13M+5000 (partial: zeroed, kept)
    run(["fallocate", "--punch-hole", "--keep-size", "-o", str(4 << 20), "-l", str(8 << 20),
         str(embedded.path / "d")])
    run(["fallocate", "--punch-hole", "--keep-size", "-o", str(13 << 20), "-l", "5000",
         str(embedded.path / "d")])
    assert disk_info(embedded, "d")["allocated"] == 8 << 20
    assert vd(embedded, "container", "ls", "--format", "json").json()[0]["used"] == used - (
        8 << 20)
    want = bytearray(data)
    want[4 << 20 : 12 << 20] = bytes(8 << 20)
    want[13 << 20 : (13 << 20) + 5000] = bytes(5000)
    with open(embedded.path / "d", "rb") as f:
        assert f.read() == bytes(want) + bytes((64 - 16) << 20)
    assert os.stat(embedded.path / "d").st_blocks * 512 == 8 << 20
    assert vd(embedded, "check").rc == 0


def test_remount_keeps_fsynced_data(mount_factory):
    m = mount_factory("m", args=["--default-container-size", "4G"])
    vd(m, "disk", "create", "d", "--size", "64M")
    c = ["--size=64M", "--randseed=1234", *FIO_VERIFY]
    fio(m.path / "d", "--do_verify=0", "--end_fsync=1", *c)
    assert m.unmount() == 0
    m2 = mount_factory("m", args=["--default-container-size", "4G"])
    fio(m2.path / "d", "--verify_only", *c)


def test_files_as_disks(embedded, tmp_path):
    p = embedded.path
    run(["truncate", "-s", "10G", str(p / "new")])
    assert os.stat(p / "new").st_size == 10 << 30
    assert disk_info(embedded, "new")["allocated"] == 0
    img = tmp_path / "image.raw"
    img.write_bytes(os.urandom(3 << 20) + b"tail")
    run(["cp", str(img), str(p / "copy")])
    assert (p / "copy").read_bytes() == img.read_bytes()
    assert disk_info(embedded, "copy")["size"] == (3 << 20) + 4
    # write past the end grows the disk like a regular file
    with open(p / "copy", "r+b") as f:
        f.seek(5 << 20)
        f.write(b"grown")
    assert os.stat(p / "copy").st_size == (5 << 20) + 5
    # rename, and the listing follows the controller
    os.rename(p / "copy", p / "renamed")
    assert sorted(os.listdir(p)) == ["new", "renamed"]
    vd(embedded, "disk", "create", "fromvdctl", "--size", "1M")
    assert "fromvdctl" in os.listdir(p)
    vd(embedded, "disk", "rm", "fromvdctl")
    assert "fromvdctl" not in os.listdir(p)
    # shrink with truncate
    os.truncate(p / "renamed", 4096)
    assert disk_info(embedded, "renamed")["size"] == 4096
    # unlink while open: the data stays readable until the last close
    with open(p / "renamed", "rb") as f:
        os.unlink(p / "renamed")
        assert "renamed" not in os.listdir(p)
        assert len(f.read()) == 4096
    # the kernel sends RELEASE after close() returns: the removal follows shortly
    wait_for(lambda: run_vdctl("--state-dir", str(embedded.state_dir), "disk", "info",
                               "renamed").rc == 1, 10, "removal after the last close")
    # bad names are refused, nothing created ('@' is kept for snapshots)
    with pytest.raises(OSError) as ei:
        open(p / "bad@name", "wb").close()
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError):
        os.mkdir(p / "dir")
    assert vd(embedded, "check").rc == 0


@pytest.mark.expect_log_errors("a fault point raises in statfs: the handler logs it",
                                match="fault point fuse.handler: statfs raises")
def test_unexpected_exception_is_eio_and_mount_stays(mount_factory):
    m = mount_factory("m", args=["--default-container-size", "1G", "--demo"],
                      env={FAULTS_ENV: "fuse.handler=raise:statfs@1+"})
    with pytest.raises(OSError) as ei:
        os.statvfs(m.path)
    assert ei.value.errno == errno.EIO
    assert os.path.ismount(m.path)
    with open(m.path / "demo", "rb") as f:
        assert f.read(4096) == bytes(4096)
    assert "unexpected error in FUSE handler statfs" in m.log()
    assert "Traceback" in m.log()


def test_statfs_and_st_blocks(embedded):
    vd(embedded, "disk", "create", "d", "--size", "16M")
    st = os.statvfs(embedded.path)
    assert st.f_blocks * st.f_frsize == (4 << 30) - LABEL_BYTES  # the container's usable
    with open(embedded.path / "d", "r+b") as f:
        f.write(b"x")
    assert os.stat(embedded.path / "d").st_blocks * 512 == 4 << 20
    subprocess.run(["sync"], check=True)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "fusermount"])
def test_clean_shutdown(mount_factory, how):

    m = mount_factory("m", args=["--default-container-size", "1G", "--demo"])
    with open(m.path / "demo", "r+b") as f:
        f.write(b"durable")
    proc = m.proc
    assert proc is not None
    if how == "fusermount":
        rc = m.unmount()
    else:
        proc.send_signal(getattr(signal, how))
        rc = proc.wait(30)
        m.proc = None
    assert rc == 0, m.log()
    assert not os.path.ismount(m.path)
    assert "signed off" in m.log()  # it released its lease: nothing waits for it
    # the embedded controller checkpointed on the way out; a new mount sees the data
    m2 = mount_factory("m2", state_dir=m.state_dir, args=["--default-container-size", "1G"])
    with open(m2.path / "demo", "rb") as f:
        assert f.read(7) == b"durable"


def test_shrink_then_grow_reads_zeros_past_the_old_end(embedded):
    p = embedded.path / "d"
    with open(p, "wb") as f:
        f.write(b"\xab" * 8192)
    os.truncate(p, 5000)
    os.truncate(p, 8192)
    data = read_direct(p, 0, 8192)
    assert data[:5000] == b"\xab" * 5000
    assert data[5000:] == bytes(8192 - 5000)


def test_one_write_spanning_several_gaps_allocates_them_all(controller, mount_factory,
                                                            tmp_path):
    add_container(controller, "c1", tmp_path / "c1.img", "64M")
    vd(controller, "disk", "create", "d", "--size", "1M", "--segment-size", "4K")
    m = agent(mount_factory, controller)
    fd = open_direct(m.path / "d")
    try:
        dwrite(fd, BLOCK, b"1" * BLOCK)  # allocate block 1 only
        dwrite(fd, 0, b"x" * (3 * BLOCK))  # blocks 0 and 2 are two gaps of one fault
        assert dread(fd, 0, 3 * BLOCK) == b"x" * (3 * BLOCK)
    finally:
        os.close(fd)
    assert controller.vdctl("check").rc == 0


def test_mounting_over_a_non_empty_directory_warns(mount_factory, tmp_path):
    """FUSE 3 mounts over files, as mount(8) does; virtfs-mount says they are hidden."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "old-file").write_bytes(b"x")
    m = mount_factory("m", args=["--default-container-size", "64M"])
    assert "m is not empty: its 1 entry is hidden while virtfs is mounted there" in m.log()
    assert not (m.path / "old-file").exists()
    m2 = mount_factory("m2", state_dir=tmp_path / "s2", args=["--default-container-size",
                                                              "64M"])
    assert "not empty" not in m2.log()


def test_stopping_an_embedded_controller_names_the_agents_left_without_it(mount_factory):
    """make run's controller lives in the first mount: a second mount on its state dir
    uses it. Stopping the first says so instead of leaving the second to hang."""
    m = mount_factory("m", args=["--default-container-size", "64M"])
    m2 = mount_factory("m2", state_dir=m.state_dir)
    assert "connecting to the controller" in m2.log()  # it uses m's controller
    assert m.proc is not None
    m.proc.send_signal(signal.SIGTERM)
    assert m.proc.wait(30) == 0
    m.proc = None
    assert "1 other agent(s) still use it" in m.log() and str(m2.path) in m.log(), m.log()
