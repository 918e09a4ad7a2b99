"""vdctl's disk verbs: create, ls, info, map, resize, rm, rename, set, clone.

Each takes the Cli of the command (its args, client and output) and returns the
exit status, as cli.Cli's methods do; cli.Cli delegates to them.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from . import perms
from . import protocol as P
from .cli_format import disk_shown, shown
from .protocol import NO_LUN, state_names
from .units import format_size, human, size_range

if TYPE_CHECKING:
    from .cli import Cli


def qos_line(q: dict[str, int], exact_bytes: bool = False) -> str:
    """A disk's QoS limits in one line: "iops 200/s, write-bps 10M/s" or "none"
    (exact_bytes, vdctl --bytes: "write-bps 10485760/s")."""
    parts = []
    for k in ("iops", "bps", "read_iops", "read_bps", "write_iops", "write_bps"):
        if k in q:
            v = format_size(q[k], exact=True) if k.endswith("bps") and not exact_bytes else (
                str(q[k]))
            parts.append(f"{k.replace('_', '-')} {v}/s")
    return ", ".join(parts) or "none"


def perm_args(a: argparse.Namespace) -> tuple[int | None, int | None, int | None]:
    """The uid, gid and mode of --owner, --group, --mode (None: not given); RemoteError
    E_INVALID with one line for an unknown user or group or a bad mode."""
    try:
        return (None if a.owner is None else perms.parse_user(a.owner),
                None if a.group is None else perms.parse_group(a.group),
                None if a.mode is None else perms.parse_mode(a.mode))
    except ValueError as e:
        raise P.invalid(str(e)) from None


def perms_shown(r: dict[str, Any]) -> dict[str, Any]:
    """A disk's reply with its owner, group and mode as vdctl shows them: names with the
    numbers, the mode in octal, the defaults said (docs/permissions.md)."""
    owner, group, mode = r.get("owner"), r.get("group"), r.get("mode")
    return {**r, "owner": "- (the mounting user)" if owner is None else perms.user_name(owner),
            "group": "- (the mounting user's)" if group is None else perms.group_name(group),
            "mode": "- (0644)" if mode is None else f"{mode:04o}"}


async def disk_create(cli: Cli) -> int:
    """vdctl disk create NAME --size SIZE: sizes from 1 byte to 1 EiB."""
    a = cli.args
    if not 0 < a.size <= P.MAX_DISK_SIZE:
        raise P.invalid(f"--size must be {size_range(1, P.MAX_DISK_SIZE)}")
    uid, gid, mode = perm_args(a)
    r = await cli.c.call("disk.create", name=a.name, size=a.size, thick=a.thick,
                         segment_size=a.segment_size, container=a.container,
                         **({"uid": uid, "gid": gid, "mode": mode}
                            if (uid, gid, mode) != (None, None, None) else {}))
    cli.warn(r)
    cli.emit_json(r) if cli.json else cli.kv_out(perms_shown(r))
    return 0


async def disk_ls(cli: Cli) -> int:
    """vdctl disk ls: a table (sizes per --bytes) or JSON."""
    rows = await cli.c.call("disk.ls")
    if cli.json:
        cli.emit_json(rows)
        return 0
    cli.table_out([[disk_shown(r), cli.sz(r["size"]), r["provisioning"],
                    cli.sz(r["allocated"]), str(r["extents"]), r["container"] or "-"]
                   for r in rows],
                  ["NAME", "SIZE", "TYPE", "ALLOCATED", "EXTENTS", "PINNED"], cli.out)
    return 0


async def disk_rename(cli: Cli) -> int:
    """vdctl disk rename NAME NEWNAME."""
    r = await cli.c.call("disk.rename", name=cli.args.name, new=cli.args.new)
    disk_out(cli, r)
    return 0


async def disk_set(cli: Cli) -> int:
    """vdctl disk set NAME [--*-limit ...] [--owner U] [--group G] [--mode M]: at least
    one of them (permissions first, then limits: two calls)."""
    a = cli.args
    limits = {k: getattr(a, f"{k}_limit") for k in
              ("iops", "bps", "read_iops", "read_bps", "write_iops", "write_bps")
              if getattr(a, f"{k}_limit") is not None}
    uid, gid, mode = perm_args(a)
    if not limits and (uid, gid, mode) == (None, None, None):
        raise P.invalid("give at least one limit (--iops-limit, --bps-limit, "
                        "--read-iops-limit, ...) or --owner, --group, --mode")
    if (uid, gid, mode) != (None, None, None):
        r = await cli.c.call("disk.perms", name=a.name, uid=uid, gid=gid, mode=mode)
    if limits:
        r = await cli.c.call("disk.set", name=a.name, limits=limits)
    disk_out(cli, r)
    return 0


async def disk_info(cli: Cli) -> int:
    """vdctl disk info NAME (or NAME@SNAP)."""
    r = await cli.c.call("disk.info", name=cli.args.name)
    disk_out(cli, r)
    return 0


def disk_out(cli: Cli, r: dict[str, Any]) -> None:
    """A disk's answer r: JSON, or key: value lines, its QoS in one line and the bytes
    it maps on each container."""
    if cli.json:
        cli.emit_json(r)
        return
    cli.kv_out({**perms_shown(r), "qos": qos_line(r.get("qos") or {}, cli.bytes)})
    for p in r.get("placement", []):
        cli.out.write(f"  on {p['container']}: {cli.sz(p['bytes'])}\n")


async def disk_map(cli: Cli) -> int:
    """vdctl disk map NAME: every page of the map, as a table (offsets never rounded) or
    one JSON document."""
    start: int | None = 0
    first = True
    while start is not None:
        page = await cli.c.call("disk.map", name=cli.args.name, start=start)
        luns = {int(k): v for k, v in page["containers"].items()}
        if first and cli.json:
            cli.out.write(json.dumps({"name": page["name"], "size": page["size"],
                                      "epoch": page["epoch"]})[:-1] + ', "entries": [')
        elif first and not getattr(cli.args, "no_headings", False):
            cli.out.write(f"{'VSTART':>16}  {'LENGTH':>14}  {'CONTAINER':<12}  "
                          f"{'OFFSET':>16}  STATE\n")
        for vstart, length, lun, offset, flags in page["rows"]:
            mapped = lun != NO_LUN
            if cli.json:
                row = {"vstart": vstart, "length": length,
                       "container": luns.get(lun) if mapped else None,
                       "lun": lun if mapped else None, "offset": offset if mapped else None,
                       "state": state_names(flags) or ["valid"]}
                cli.out.write(("\n  " if first else ",\n  ") + json.dumps(row))
            else:
                st = ",".join(state_names(flags)) or "valid"
                cli.out.write(f"{cli.sz(vstart, True):>16}  {cli.sz(length, True):>14}  "
                              f"{(luns.get(lun, '?') if mapped else '-'):<12}  "
                              f"{(cli.sz(offset, True) if mapped else '-'):>16}  "
                              f"{st}\n")
            first = False
        start = page["next"]
    if cli.json:
        cli.out.write("\n]}\n")
    return 0


async def disk_resize(cli: Cli) -> int:
    """vdctl disk resize NAME SIZE|+SIZE|-SIZE [--allow-shrink] [-n]."""
    sign, amount = cli.args.size
    size = amount
    if sign:
        cur = (await cli.c.call("disk.info", name=cli.args.name))["size"]
        size = cur + amount if sign == "+" else cur - amount
        if size < 0:
            raise P.invalid(f"cannot shrink {cli.args.name!r} ({human(cur)}) by "
                            f"{human(amount)}")
    r = await cli.c.call("disk.resize", name=cli.args.name, size=size,
                         allow_shrink=cli.args.allow_shrink, **cli.dry_arg())
    if r.get("dry_run"):
        return cli.dry(r, resize_line(cli, r))
    cli.warn(r)
    cli.emit_json(r) if cli.json else cli.kv_out(r)
    return 0


def resize_line(cli: Cli, r: dict[str, Any]) -> str:
    """What a disk.resize dry run's answer r says would happen, in one line."""
    old, new = r["old_size"], r["size"]
    name = shown(r["name"])
    if new < old:
        return (f"{name} would shrink from {cli.said(old)} to {cli.said(new)}: the "
                f"{cli.said(old - new)} past the new end (bytes {new} to {old}) would be "
                f"discarded, {cli.said(r['freed'])} of storage freed")
    if new > old:
        return f"{name} would grow from {cli.said(old)} to {cli.said(new)}, " + (
            f"{cli.said(r['allocated'] - old)} allocated now" if r["provisioning"] == "thick"
            else "thin (nothing allocated now)")
    return f"{name} would stay at {cli.said(old)}"


async def disk_rm(cli: Cli) -> int:
    """vdctl disk rm NAME [-n]: the bytes freed on stderr (the dry run's line on stdout)."""
    r = await cli.c.call("disk.rm", name=cli.args.name, **cli.dry_arg())
    if r.get("dry_run"):
        return cli.dry(r, f"disk {shown(r['name'])} would be removed: "
                       f"{cli.said(r['freed'])} of storage freed")
    if cli.json:
        cli.emit_json(r)
    print(f"disk {shown(r['name'])} removed ({cli.said(r['freed'])} freed)",
          file=sys.stderr)
    return 0


async def disk_clone(cli: Cli) -> int:
    """vdctl disk clone NAME@SNAP NEWNAME."""
    r = await cli.c.call("disk.clone", name=cli.args.snap, new=cli.args.new)
    cli.emit_json(r) if cli.json else cli.kv_out(r)
    return 0
