"""A state dir from before labels is labelled at its first start (docs/labels.md).

The state is made as the version before labels left it: containers added by a
record without a label id, and disks whose data starts at the container's first
block.
"""

from __future__ import annotations

import os

import trio

from controller import label as L
from controller.daemon import open_controller_service
from controller.protocol import LABEL_BYTES
from controller.records import ContainerAdd

MB = 1 << 20


async def test_a_state_from_before_labels_is_labelled_at_start(tmp_path):
    state = str(tmp_path / "s")
    imgs = {n: tmp_path / f"{n}.img" for n in ("c1", "c2", "c3")}
    data = os.urandom(MB)
    async with open_controller_service(state, lease=1.0) as svc:
        for name, img in imgs.items():
            img.touch()
            os.truncate(img, 16 * MB)
            await svc.journal.commit(ContainerAdd(name, svc.state.next_lun, str(img),
                                                  16 * MB, False))
        await svc.disk_create("x", MB, True, None, "c1")   # one disk on c1's first block
        await svc.disk_create("y", MB, True, None, "c3")   # ... and one with a snapshot
        await svc.snap_create("y@s")
        first = next(iter(svc.state.disks["x"].extents))
        assert (first.lun, first.offset) == (svc.state.containers["c1"].lun, 0)
        fd = os.open(imgs["c1"], os.O_WRONLY)
        os.pwrite(fd, data, 0)
        os.close(fd)

    async with open_controller_service(state, lease=1.0) as svc:
        cs = svc.state.containers
        # empty: labelled before the controller serves
        assert cs["c2"].uuid is not None
        assert L.decode(L.read_sectors(str(imgs["c2"]))[0]) is not None
        # c1: its first block moves (as any segment moves), then it is labelled
        with trio.fail_after(30):
            while cs["c1"].uuid is None:
                await trio.sleep(0.05)
        lab = L.decode(L.read_sectors(str(imgs["c1"]))[0])
        assert lab is not None
        assert (lab.installation, lab.container) == (svc.state.installation, cs["c1"].uuid)
        got = bytearray()
        for e in svc.state.disks["x"].extents:
            assert not (e.lun == cs["c1"].lun and e.offset < LABEL_BYTES), e
            fd = os.open(svc.state.luns[e.lun].path, os.O_RDONLY)
            got += os.pread(fd, e.length, e.offset)
            os.close(fd)
        assert bytes(got) == data
        # c3's first block is a snapshot's too: it waits (and says why)
        await trio.sleep(2)
        assert cs["c3"].uuid is None
        info = await svc.container_info("c3")
        assert "y@s" in str(info["label"]) and str(info["label"]).startswith("none"), info
        chk = await svc.check()
        assert chk["ok"], chk
