"""Container labels on real mounts (docs/labels.md).

- A host whose container path leads to a different file than the controller's host
  sees (a device renamed at boot, another LUN at the same /dev path): the agent checks
  the label before its first I/O, refuses the container, and writes nothing there. The
  other host is played by a mount namespace in which the path is bind-mounted over with
  another file; the agent runs (and its I/O is done) inside it through nsenter.
- A state dir from before labels is labelled at its first start by moving the data in
  each container's first MiB elsewhere with the ordinary online move: an agent's writes
  during that move keep their data (fio --verify).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio
from rig import BIN, FAULTS_ENV, FIO_VERIFY, ControllerProc, fio, hold_copier, vd, wait_for

from controller import label as L
from controller.daemon import open_controller_service
from controller.protocol import LABEL_BYTES
from controller.records import ContainerAdd

MB = 1 << 20


@contextmanager
def agent_in_namespace(tmp_path: Path, c: ControllerProc, name: str,
                       bind: tuple[Path, Path] | None) -> Iterator[tuple[int, Path]]:
    """A virtfs-mount in a mount namespace of its own, as on another host; with bind
    (source, target), target is bind-mounted over with source there first. Yields (pid,
    mountpoint); the mount is seen only inside that namespace (use nsenter -t pid -m)."""
    mnt = tmp_path / name
    mnt.mkdir()
    log = tmp_path / f"{name}.log"
    script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"' if bind else 'exec "$@"'
    src_dst = [str(bind[0]), str(bind[1])] if bind else []
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
             *src_dst, str(BIN / "virtfs-mount"), str(mnt), "--controller", c.addr],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while in_ns(proc.pid, "mountpoint", "-q", str(mnt)).returncode != 0:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield proc.pid, mnt
    finally:
        if proc.poll() is None:
            in_ns(proc.pid, "fusermount3", "-u", "-z", str(mnt))
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def in_ns(pid: int, *cmd: str) -> subprocess.CompletedProcess[str]:
    """Run cmd in process pid's mount namespace."""
    return subprocess.run(["nsenter", "-t", str(pid), "-m", "--", *cmd],
                          capture_output=True, text=True, timeout=60)


def test_an_agent_whose_path_leads_to_another_file_refuses_the_container(controller,
                                                                          tmp_path):
    c = controller
    img, other = tmp_path / "c1.img", tmp_path / "other.img"
    vd(c, "container", "add", "c1", str(img), "--size", "64M")
    vd(c, "disk", "create", "x", "--size", "16M", "--thick")
    other.write_bytes(os.urandom(64 * MB))  # what the other host has at the path
    before = other.read_bytes()

    # the oracle passes where the path leads to the container: a namespace, no bind
    with agent_in_namespace(tmp_path, c, "same", None) as (pid, mnt):
        w = in_ns(pid, "dd", "if=/dev/urandom", f"of={mnt}/x", "bs=4k", "count=4",
                  "oflag=direct", "conv=notrunc,fsync")
        assert w.returncode == 0, w.stderr
        r = in_ns(pid, "dd", f"if={mnt}/x", "of=/dev/null", "bs=4k", "count=4",
                  "iflag=direct")
        assert r.returncode == 0, r.stderr

    # the path leads to another file on this "host": its I/O fails, nothing is written
    with agent_in_namespace(tmp_path, c, "elsewhere", (other, img)) as (pid, mnt):
        r = in_ns(pid, "dd", f"if={mnt}/x", "of=/dev/null", "bs=4k", "count=1",
                  "iflag=direct")
        assert r.returncode != 0 and "Input/output error" in r.stderr, r.stderr
        w = in_ns(pid, "dd", "if=/dev/zero", f"of={mnt}/x", "bs=4k", "count=4",
                  "oflag=direct", "conv=notrunc,fsync")
        assert w.returncode != 0 and "Input/output error" in w.stderr, w.stderr
        log = (tmp_path / "elsewhere.log").read_text()
        assert f"container LUN 1 ({img}) label missing" in log, log
        assert "refusing its I/O" in log, log
    assert other.read_bytes() == before  # never written, not even a label or a beat
    lab = L.decode(L.read_sectors(str(img))[0])  # the real container is untouched
    assert lab is not None and lab.name == "c1"


async def make_state_from_before_labels(state: Path, img: Path, size: int) -> None:
    """A state dir as the version before labels left it: container c1 added without a
    label id (img: a 64 MiB file), a thick disk x of size on it from its first block."""
    async with open_controller_service(str(state), lease=1.0) as svc:
        await svc.journal.commit(ContainerAdd("c1", svc.state.next_lun, str(img),
                                              64 * MB, False))
        await svc.disk_create("x", size, True, None, "c1")
        first = next(iter(svc.state.disks["x"].extents))
        assert (first.lun, first.offset) == (svc.state.containers["c1"].lun, 0)


def test_writes_during_the_upgrades_first_mib_move_keep_their_data(tmp_path, mount_factory):
    """The first start of this version moves x's first MiB off c1's label region (held
    half done by a fault point) while fio writes all over x with verify: every write
    lands, reads during the move see them, and c1 is labelled once the move commits."""
    state, img = tmp_path / "state", tmp_path / "c1.img"
    img.touch()
    os.truncate(img, 64 * MB)
    trio.run(make_state_from_before_labels, state, img, 16 * MB)
    hold = tmp_path / "hold"
    hold.touch()
    c = ControllerProc(state, tmp_path / "controller.log",
                       env={**os.environ, FAULTS_ENV: hold_copier(hold)})
    c.start()
    try:
        m = mount_factory("m", controller=c.addr)
        x = m.path / "x"
        work = tmp_path / "fio"
        work.mkdir()
        args = [*FIO_VERIFY, "--direct=1", "--size=16M", "--randseed=7"]
        fio(x, *args, "--verify_backlog=64", "--fsync=32", cwd=work)
        # the move is still half done: c1 is not labelled yet, the data is all there
        assert L.decode(L.read_sectors(str(img))[0]) is None
        first = vd(c, "disk", "map", "x", "--format", "json").json()["entries"][0]
        assert first["vstart"] == 0 and first["state"] != ["valid"], first  # moving
        fio(x, *args, "--verify_only", cwd=work)
        hold.unlink()
        wait_for(lambda: L.decode(L.read_sectors(str(img))[0]) is not None, 30,
                 "c1 to be labelled")
        fio(x, *args, "--verify_only", cwd=work)
        entries = vd(c, "disk", "map", "x", "--format", "json").json()["entries"]
        assert all(e["state"] == ["valid"] and e["offset"] >= LABEL_BYTES for e in entries)
        # the oracle fails on data that is not fio's
        with open(x, "r+b") as f:
            f.seek(5 * MB)
            f.write(bytes(4096))
        bad = fio(x, *args, "--verify_only", cwd=work, check=False)
        assert bad.returncode != 0
        r = c.vdctl("check")
        assert r.rc == 0, r.out + r.err
    finally:
        c.stop()
