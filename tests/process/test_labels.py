"""Container labels (docs/labels.md): a container belongs to one installation.

Two installations (two controllers, each with its own state dir) on one file:
the second is refused, --force waits for the first's heartbeat and refuses while
it beats, and takes over once it has stopped; the first then fails the container
at its next start. A file holding a file system is refused unless --force, which
wipes the signature.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest
from rig import ControllerProc, wait_for

from controller import label as L
from controller.protocol import LABEL_BYTES

LEASE = ["--lease", "1"]  # a short hold: --force watches the heartbeat for 5*2+1.5 s


def data_digest(path: Path) -> str:
    """The container's label and data (not its heartbeat sector, which changes)."""
    with open(path, "rb") as f:
        label = f.read(L.SECTOR)
        f.seek(2 * L.SECTOR)
        return hashlib.sha256(label + f.read()).hexdigest()


def containers(c: ControllerProc) -> dict[str, dict[str, object]]:
    r = c.vdctl("container", "ls", "--format", "json")
    assert r.rc == 0, r.err
    return {x["name"]: x for x in json.loads(r.out)}


@pytest.fixture
def two(tmp_path: Path):
    a = ControllerProc(tmp_path / "a", tmp_path / "a.log")
    b = ControllerProc(tmp_path / "b", tmp_path / "b.log")
    a.start(LEASE)
    b.start(LEASE)
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.mark.expect_log_errors("A's restart finds B's label on its container",
                               match="another installation took it over")
def test_a_container_of_another_installation_is_refused_then_taken_over(two, tmp_path):
    a, b = two
    img = tmp_path / "c1.img"
    assert a.vdctl("container", "add", "c1", str(img), "--size", "64M").rc == 0
    assert a.vdctl("disk", "create", "x", "--size", "16M", "--thick").rc == 0
    with open(img, "r+b") as f:  # data of x's (a thick disk maps right after the label)
        f.seek(LABEL_BYTES)
        f.write(b"x's data" * 512)
    lab = L.decode(L.read_sectors(str(img))[0])
    assert lab is not None and lab.name == "c1"
    before = data_digest(img)

    # the theft of the issue: refused, with one line naming the owner; nothing written
    r = b.vdctl("container", "add", "stolen", str(img))
    assert r.rc != 0
    assert "belongs to another virtfs installation" in r.err and "'c1'" in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1, r.err
    assert data_digest(img) == before
    assert "stolen" not in containers(b)

    # --force while A's controller beats its heartbeat: still refused
    r = b.vdctl("container", "add", "stolen", str(img), "--force")
    assert r.rc != 0 and "still in use" in r.err, r.err
    assert data_digest(img) == before

    # A stops: nothing answers for the container any more; --force takes it over
    a.stop()
    r = b.vdctl("container", "add", "stolen", str(img), "--force")
    assert r.rc == 0, r.err
    mine = L.decode(L.read_sectors(str(img))[0])
    assert mine is not None and mine.name == "stolen" and mine.installation != lab.installation
    assert containers(b)["stolen"]["label"] == "ok"

    # A comes back: it finds B's label and fails the container instead of using it
    a.start(LEASE)
    c1 = containers(a)["c1"]
    assert c1["state"] == "error", c1
    assert str(c1["label"]).startswith("claimed by installation " + mine.installation[:12])
    r = a.vdctl("container", "restore", "c1")
    assert r.rc != 0 and "not this installation's any more" in r.err, r.err


def test_removing_a_container_erases_its_label(two, tmp_path):
    a, b = two
    img = tmp_path / "c1.img"
    assert a.vdctl("container", "add", "c1", str(img), "--size", "16M").rc == 0
    assert a.vdctl("container", "rm", "c1").rc == 0
    assert L.decode(L.read_sectors(str(img))[0]) is None
    # as after pvremove: another installation may take the file without --force
    r = b.vdctl("container", "add", "c1", str(img))
    assert r.rc == 0, r.err


def test_a_file_system_is_refused_unless_forced(controller, tmp_path):
    img = tmp_path / "fs.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img), "16M"], check=True)
    r = controller.vdctl("container", "add", "c1", str(img))
    assert r.rc != 0 and "ext4 file system" in r.err, r.err
    assert L.signatures(str(img)) == ["ext4 file system"]  # untouched
    r = controller.vdctl("container", "add", "c1", str(img), "--force")
    assert r.rc == 0, r.err
    assert L.signatures(str(img)) == []  # wiped, as pvcreate -ff does
    assert containers(controller)["c1"]["label"] == "ok"


@pytest.mark.expect_log_errors("the label is overwritten on purpose",
                               match="another installation took it over")
def test_a_label_overwritten_while_running_fails_the_container(controller, tmp_path):
    img = tmp_path / "c1.img"
    assert controller.vdctl("container", "add", "c1", str(img), "--size", "16M").rc == 0
    other = L.Label(L.new_id(), L.new_id(), 16 << 20, 1, "theirs", 0.0)
    beat = L.Beat(other.installation, L.new_id(), 1, 0.0, 2.0, 10.0)
    L.write_label(str(img), other, beat)
    # the next heartbeat sees it
    wait_for(lambda: containers(controller)["c1"]["state"] == "error", 10,
             "the container to fail")
    assert str(containers(controller)["c1"]["label"]).startswith("claimed by")
    log = controller.log_path.read_text()
    assert "label claimed by installation " + other.installation[:12] in log


@pytest.mark.expect_log_errors("the label is removed on purpose", match="label missing")
def test_a_label_wiped_while_running_fails_the_container_until_relabelled(controller,
                                                                          tmp_path):
    img = tmp_path / "c1.img"
    assert controller.vdctl("container", "add", "c1", str(img), "--size", "16M").rc == 0
    with open(img, "r+b") as f:
        f.write(bytes(4096))
    wait_for(lambda: containers(controller)["c1"]["state"] == "error", 10,
             "the container to fail")
    assert containers(controller)["c1"]["label"].startswith("missing")
    assert L.read_sectors(str(img))[0] == bytes(L.SECTOR)  # nothing written back
    r = controller.vdctl("container", "restore", "c1")
    assert r.rc != 0 and "--relabel" in r.err, r.err
    r = controller.vdctl("container", "restore", "c1", "--relabel")
    assert r.rc == 0, r.err
    c1 = containers(controller)["c1"]
    assert (c1["state"], c1["label"]) == ("ok", "ok")


@pytest.mark.expect_log_errors("another file is put at the path", match="label missing")
def test_another_file_at_a_containers_path_is_never_written(controller, tmp_path):
    """As after a device rename at boot: the path now leads to someone else's data. The
    controller fails the container and writes nothing there: no label, no heartbeat, no
    wipe at rm, no relabel over a file system."""
    img = tmp_path / "c1.img"
    assert controller.vdctl("container", "add", "c1", str(img), "--size", "16M").rc == 0
    controller.stop()
    img.unlink()
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img), "16M"], check=True)
    before = img.read_bytes()
    controller.start()
    c1 = containers(controller)["c1"]
    assert c1["state"] == "error" and c1["label"].startswith("missing"), c1
    r = controller.vdctl("container", "restore", "c1", "--relabel")
    assert r.rc != 0 and "ext4 file system" in r.err, r.err
    time.sleep(2 * L.HEARTBEAT_INTERVAL)
    assert controller.vdctl("container", "rm", "c1").rc == 0
    assert img.read_bytes() == before
