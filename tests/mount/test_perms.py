"""A disk's owner, group and mode, and --allow-other (docs/permissions.md; issue 17
item 8: qemu running as another user, e.g. libvirt-qemu, must be able to open disks).

A second user is nobody (65534), through setpriv: cat and dd run as it are the
oracle, refused (EACCES) or not as the kernel decides from what the mount shows. The
mountpoints sit in a directory of their own that other users may traverse (pytest's
tmp_path is 0700).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rig import MountProc, add_container, agent, disk_info, vd, wait_for

from virtfs import mount as vmount

NOBODY = 65534
AS_NOBODY = ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"]


def as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AS_NOBODY, *cmd], capture_output=True, text=True, timeout=30)


def nobody_reads(path: Path) -> bool:
    r = as_nobody("dd", f"if={path}", "of=/dev/null", "bs=4k", "count=1")
    assert r.returncode == 0 or "Permission denied" in r.stderr, r.stderr
    return r.returncode == 0


def nobody_writes(path: Path) -> bool:
    r = as_nobody("dd", "if=/dev/zero", f"of={path}", "bs=4k", "count=1", "conv=notrunc")
    assert r.returncode == 0 or "Permission denied" in r.stderr, r.stderr
    return r.returncode == 0


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory any user may traverse, for mountpoints; removed after."""
    d = Path(tempfile.mkdtemp(prefix="virtfs-perms-"))
    d.chmod(0o711)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def open_mount(open_dir: Path, tmp_path: Path) -> Iterator[Any]:
    """open_mount(controller, name, args) -> a started MountProc in open_dir."""
    made: list[MountProc] = []

    def make(c: Any, name: str, args: list[str]) -> MountProc:
        m = MountProc(open_dir / name, c.state_dir, tmp_path / f"{name}.log",
                      controller=c.addr, args=args)
        made.append(m)
        return m.start()

    yield make
    for m in reversed(made):
        m.close()  # fusermount3 -u -z, then wait / terminate / kill


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_allow_other_modes_owners_pushed_and_journaled(controller: Any, tmp_path: Path,
                                                       open_mount: Any,
                                                       mount_factory: Any) -> None:
    add_container(controller, "c1", tmp_path / "c1.img", "256M")
    vd(controller, "disk", "create", "d", "--size", "1M", "--mode", "0600")
    m = open_mount(controller, "m", ["--allow-other"])
    other = agent(mount_factory, controller, "m2")  # a second mount, root reads it
    d, d2 = m.path / "d", other.path / "d"
    assert mode_of(d) == 0o600 and os.stat(d).st_uid == 0
    assert not nobody_reads(d) and not nobody_writes(d)

    assert mode_of(d2) == 0o600  # cached there now (attributes for 1 s, the listing 1 s)
    held = os.open(d2, os.O_RDONLY)  # open there: its attributes come from its listing
    try:
        os.chmod(d, 0o666)  # through the mount
        # pushed: the other mount took the new mode and dropped its cached attributes
        # before chmod returned (without the push: the old mode, for as long as it
        # holds the disk open)
        wait_for(lambda: mode_of(d2) == 0o666, 0.3, "chmod seen by the other mount")
        time.sleep(2.5)  # and it stays so past every cache's life
        assert mode_of(d2) == 0o666
    finally:
        os.close(held)
    assert nobody_reads(d) and nobody_writes(d)
    assert disk_info(controller, "d")["mode"] == 0o666

    vd(controller, "disk", "set", "d", "--mode", "0600")
    wait_for(lambda: mode_of(d) == 0o600, 5, "vdctl disk set --mode seen by the mount")
    assert not nobody_reads(d)

    assert os.stat(d2).st_uid == 0
    os.chown(d, NOBODY, -1)  # root gives it to nobody: 0600 is now nobody's to open
    wait_for(lambda: os.stat(d2).st_uid == NOBODY, 0.3, "chown seen by the other mount")
    assert nobody_reads(d) and nobody_writes(d)
    # as chown(2): the owner may not give the disk away, nor take a group it is not in
    r = as_nobody("chown", "0", str(d))
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r.stderr
    r = as_nobody("chgrp", "1", str(d))
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r.stderr
    assert as_nobody("chmod", "0640", str(d)).returncode == 0  # the owner may chmod
    assert disk_info(controller, "d")["mode"] == 0o640

    # snapshots show no write bits whatever the mode; a clone takes its origin's perms
    vd(controller, "snap", "create", "d@s")
    wait_for(lambda: (m.path / "d@s").exists(), 5, "the snapshot in the mount")
    assert mode_of(m.path / "d@s") == 0o440 and os.stat(m.path / "d@s").st_uid == NOBODY
    vd(controller, "disk", "clone", "d@s", "e")
    info = disk_info(controller, "e")
    assert (info["owner"], info["group"], info["mode"]) == (NOBODY, None, 0o640)

    controller.restart()  # journaled: the same after a restart, in a new mount
    info = disk_info(controller, "d")
    assert (info["owner"], info["group"], info["mode"]) == (NOBODY, None, 0o640)
    third = agent(mount_factory, controller, "m3")
    st = os.stat(third.path / "d")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o640)


def test_other_users_cannot_create_or_remove_disks(controller: Any, tmp_path: Path,
                                                    open_mount: Any) -> None:
    """The mount's directory is the mounting user's, 0755: other users open disks as
    their modes allow, but create, rename and remove none (the admin does, with vdctl
    or as the mounting user)."""
    add_container(controller, "c1", tmp_path / "c1.img", "256M")
    vd(controller, "disk", "create", "d", "--size", "1M", "--mode", "0666")
    m = open_mount(controller, "m", ["--allow-other"])
    st = os.stat(m.path)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)
    for cmd in (["dd", "if=/dev/zero", f"of={m.path}/new", "bs=4k", "count=1"],
                ["mv", f"{m.path}/d", f"{m.path}/e"], ["rm", "-f", f"{m.path}/d"]):
        r = as_nobody(*cmd)
        assert r.returncode != 0 and "Permission denied" in r.stderr, (cmd, r.stderr)
    assert sorted(os.listdir(m.path)) == ["d"]
    assert nobody_writes(m.path / "d")


def test_without_allow_other_no_other_user_gets_in(controller: Any, tmp_path: Path,
                                                    open_mount: Any) -> None:
    """The oracle can fail: the same read as above, on a 0666 disk, is refused when the
    mount lacks --allow-other (the kernel lets only the mounting user in)."""
    add_container(controller, "c1", tmp_path / "c1.img", "256M")
    vd(controller, "disk", "create", "d", "--size", "1M", "--mode", "0666")
    m = open_mount(controller, "m", [])
    assert mode_of(m.path / "d") == 0o666  # root, the mounting user, sees it
    assert not nobody_reads(m.path / "d")
    r = as_nobody("ls", str(m.path))
    assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr


def test_allow_other_needs_user_allow_other_for_a_user(tmp_path: Path, monkeypatch: Any,
                                                       capsys: Any) -> None:
    conf = tmp_path / "fuse.conf"
    conf.write_text("# mount_max = 1000\n#user_allow_other\n")
    assert not vmount.user_allow_other(str(conf))
    monkeypatch.setattr(vmount, "FUSE_CONF", str(conf))
    monkeypatch.setattr(vmount.os, "geteuid", lambda: 1000)
    (tmp_path / "mnt").mkdir()
    assert vmount.main([str(tmp_path / "mnt"), "--allow-other"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "user_allow_other" in err and str(conf) in err, err
    conf.write_text("user_allow_other  # for qemu\n")
    assert vmount.user_allow_other(str(conf))
