"""snap rm of a snapshot with many extents, all still shared with its disk, costs
O(extent chunks) and plans in bounded steps (docs/snapshots.md): meanwhile another
disk's I/O that needs the controller (a discard and the allocating write after it)
is never held up long. (A snapshot that owns its extents still frees them in one
O(extents) apply: the README's Snapshots benchmark measures that.)"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from pathlib import Path

from rig import dwrite, open_direct, open_rig

B = 4096
SEG = 16 << 10
NSEG = 131072  # extents (a 1 TiB disk of 4 MiB segments has 262,144)


def _build(state_dir: Path, img: Path) -> None:
    """A 2 GiB disk "big" of 16 KiB segments, each mapped (none merging), snapshotted
    as big@s (which shares every extent). A disk "w" to write."""
    from controller.checkpoint import write_checkpoint
    from controller.records import ContainerAdd, DiskCreate, DiskMap, SnapCreate
    from controller.state import State

    size = NSEG * SEG
    with open(img, "wb") as f:
        f.truncate(2 * size)
    st = State()
    st.apply(ContainerAdd("c0", 1, str(img), 2 * size, True), 1)
    st.apply(DiskCreate("big", size, SEG, False, None, 1, time.time(), []), 2)
    st.apply(DiskCreate("w", 64 << 20, 4 << 20, False, None, 1, time.time(), []), 3)
    base = st.luns[1].space.plan(size)[0][0]
    # segment i at the container's segment NSEG-1-i: neighbours never merge
    st.apply(DiskMap("big", [(i * SEG, SEG, 1, base + (NSEG - 1 - i) * SEG)
                             for i in range(NSEG)]), 4)
    st.apply(SnapCreate("big", "s", time.time()), 5)
    assert len(st.snaps["big@s"].extents) == NSEG
    write_checkpoint(str(state_dir), st)


def test_snap_rm_of_many_extents_keeps_other_disks_going(tmp_path):
    (tmp_path / "state").mkdir(mode=0o700)
    _build(tmp_path / "state", tmp_path / "c0.img")
    libc = ctypes.CDLL(None, use_errno=True)
    with open_rig(tmp_path) as rig:
        fd = open_direct(rig.mnt / "w")
        lat: list[float] = []
        done = threading.Event()
        errors: list[BaseException] = []

        def rm() -> None:
            try:
                rig.vdctl("snap", "rm", "big@s")
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
            finally:
                done.set()

        try:
            dwrite(fd, 0, os.urandom(B))
            th = threading.Thread(target=rm)
            th.start()
            k = 0
            while not done.is_set():
                off = (k % 16) * (4 << 20)
                t0 = time.monotonic()
                # a discard (disk.discard) and the write after it (an allocating fault)
                assert libc.fallocate(fd, 3, ctypes.c_long(off), ctypes.c_long(4 << 20)) == 0
                dwrite(fd, off, os.urandom(B))
                lat.append(time.monotonic() - t0)
                k += 1
            th.join()
        finally:
            os.close(fd)
        assert not errors, errors
        assert not rig.json("snap", "ls", "big")
        assert len(lat) >= 3, lat
        # the worst was 3.7 s before the steps (the plan, twice, and the apply each an
        # O(extents) walk on the loop), 0.035 s with them (load average 9-11)
        assert max(lat) < 1.0, sorted(lat)[-5:]
        rig.vdctl("check")
