"""End-to-end: vdctl against a real controller process."""

from __future__ import annotations


def test_containers_and_disks_survive_restart(controller, tmp_path):
    v = controller.vdctl
    assert v("container", "add", "c1", str(tmp_path / "c1.img"), "--size", "1G").rc == 0
    assert v("disk", "create", "thin", "--size", "100M").rc == 0
    assert v("disk", "create", "thick", "--size", "12345", "--thick").rc == 0
    before = v("disk", "map", "thick", "--format", "json")
    assert before.rc == 0, before.err
    controller.restart()
    after = v("disk", "map", "thick", "--format", "json")
    assert after.out == before.out
    assert [d["name"] for d in v("disk", "ls", "--format", "json").json()] == ["thick", "thin"]
