"""A disk's owner, group and mode (controller/perms.py, virtfs/perms.py): the record
through the one apply, inheritance by snapshots and clones, the checkpoint, vdctl's
parsing, and the chown(2)/chmod(2) rules a mount applies."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from stateimage import image

from controller import perms
from controller.checkpoint import load_checkpoint, write_checkpoint
from controller.records import (
    ContainerAdd,
    DiskClone,
    DiskCreate,
    DiskPerms,
    SnapCreate,
    decode,
)
from controller.state import State
from controller.tables import StateError
from virtfs import perms as vperms
from virtfs.errors import DiskError


def state() -> State:
    s = State()
    for k, r in enumerate([ContainerAdd("c", 1, "/dev/null/c", 1 << 30, True),
                           DiskCreate("d", 1 << 20, 1 << 20, False, None, 1, 1.0, [])], 1):
        s.apply(r, k)
    return s


def test_defaults_then_set_then_inherited_by_snapshot_and_clone():
    s = state()
    d = s.disks["d"]
    assert (d.owner, d.group, d.mode) == (None, None, None)  # what mounts showed before
    assert d.to_dict(s.luns)["mode"] is None
    s.apply(DiskPerms("d", 64055, 64055, 0o640), 3)
    assert (d.owner, d.group, d.mode) == (64055, 64055, 0o640)
    s.apply(SnapCreate("d", "s", 2.0), 4)
    s.apply(DiskPerms("d", None, None, 0o600), 5)  # later changes leave the snapshot be
    s.apply(DiskClone("d@s", "e", 3.0), 6)
    snap, e = s.snaps["d@s"], s.disks["e"]
    assert (snap.owner, snap.group, snap.mode) == (64055, 64055, 0o640)
    assert (e.owner, e.group, e.mode) == (64055, 64055, 0o640)
    assert (d.owner, d.group, d.mode) == (None, None, 0o600)


def test_refused_records_change_nothing():
    s = state()
    before = image(s)
    for rec in (DiskPerms("nope", 1, 1, 0o600), DiskPerms("d@s", 1, 1, 0o600),
                DiskPerms("d", 1, 1, 0o1000)):
        with pytest.raises(StateError):
            s.apply(rec)
    assert image(s) == before


def test_checkpoint_keeps_them_and_an_old_one_has_none(tmp_path: Path):
    s = state()
    write_checkpoint(str(tmp_path), s)
    assert (load_checkpoint(str(tmp_path)).disks["d"].mode) is None
    s.apply(DiskPerms("d", 0, 6, 0o660), 3)
    s.apply(SnapCreate("d", "s", 2.0), 4)
    write_checkpoint(str(tmp_path), s)
    back = load_checkpoint(str(tmp_path))
    assert image(back) == image(s)
    assert (back.snaps["d@s"].group, back.snaps["d@s"].mode) == (6, 0o660)


def test_the_record_round_trips():
    rec = DiskPerms("d", None, 6, 0o640)
    assert decode({**rec.to_wire(), "seq": 3}) == rec


@pytest.mark.parametrize(("text", "mode"), [("640", 0o640), ("0640", 0o640),
                                            ("0o600", 0o600), ("0", 0), ("777", 0o777)])
def test_parse_mode(text, mode):
    assert perms.parse_mode(text) == mode


@pytest.mark.parametrize("text", ["", "u+rw", "0999", "1777", "4755", "-1", "0x1ff", "8"])
def test_parse_mode_refuses(text):
    with pytest.raises(ValueError, match="bad mode"):
        perms.parse_mode(text)


def test_parse_users_and_groups():
    assert perms.parse_user("root") == 0 and perms.parse_user("65534") == 65534
    assert perms.parse_group("root") == 0 and perms.parse_group("7") == 7
    with pytest.raises(ValueError, match="unknown user 'no-such-user-x'"):
        perms.parse_user("no-such-user-x")
    with pytest.raises(ValueError, match="unknown group 'no-such-group-x'"):
        perms.parse_group("no-such-group-x")
    with pytest.raises(ValueError, match="bad uid"):
        perms.parse_user("4294967295")


def test_shown_defaults_and_snapshots():
    assert vperms.shown(None, None, None, False, (1000, 100)) == vperms.Owner(1000, 100, 0o644)
    assert vperms.shown(None, None, None, True, (1000, 100)).mode == 0o444
    assert vperms.shown(7, 8, 0o660, True, (0, 0)) == vperms.Owner(7, 8, 0o440)


OWNED = vperms.Owner(1000, 100, 0o640)


@pytest.mark.parametrize(("caller", "groups", "change", "ok"), [
    (0, {0}, (5, 5, 0o600), True),  # root: anything
    (1000, {100}, (None, None, 0o600), True),  # the owner: chmod
    (1000, {100}, (1000, None, None), True),  # the owner "changes" it to itself
    (1000, {100}, (5, None, None), False),  # the owner may not give it away
    (1000, {100, 27}, (None, 27, None), True),  # to one of its groups
    (1000, {100}, (None, 27, None), False),  # not to another
    (1000, {100}, (None, 100, None), True),  # the group it has
    (1001, {100}, (None, None, 0o666), False),  # another user: no chmod
    (1001, {100}, (None, 100, None), False),  # nor chgrp, even to the same group
])
def test_chown_chmod_rules(caller, groups, change, ok):
    if ok:
        vperms.check_change(caller, groups, OWNED, *change)
    else:
        with pytest.raises(DiskError) as e:
            vperms.check_change(caller, groups, OWNED, *change)
        assert e.value.errno == errno.EPERM
