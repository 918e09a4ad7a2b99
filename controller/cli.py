"""vdctl: the admin CLI. Talks to the controller over its socket.

The commands are here; the parser is cli_args, the table output cli_format.

JSON goes to stdout, notices to stderr. Exit 0 on success, 1 on an error
(one line on stderr), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import trio

from . import cli_backup, perms
from . import protocol as P
from .cli_args import build_parser, rewrite_negative
from .cli_format import disk_shown, kv, pct, shown, table
from .client import (
    DEFAULT_TIMEOUT,
    Client,
    ConnectionLost,
    open_controller,
    security_from_args,
)
from .protocol import NO_LUN, state_names
from .statedir import default_socket, default_state_dir
from .transport import SecurityConfigError, parse_addr
from .units import format_size

JOB_POLL = 0.5  # seconds between progress polls


def qos_line(q: dict[str, int]) -> str:
    """A disk's QoS limits in one line: "iops 200/s, write-bps 10M/s" or "none"."""
    parts = []
    for k in ("iops", "bps", "read_iops", "read_bps", "write_iops", "write_bps"):
        if k in q:
            v = format_size(q[k]) if k.endswith("bps") else str(q[k])
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


class Cli:
    """One vdctl command: a method per NOUN_VERB, run against a connected client.

    Output (table or JSON, per args.format) goes to out; notices and warnings to
    stderr. Each method returns the exit status; RemoteError propagates to main.
    """

    def __init__(self, args: argparse.Namespace, client: Client, out: TextIO):
        self.args = args
        self.c = client
        self.out = out
        self.json = getattr(args, "format", None) == "json"

    def _table(self, rows: list[list[str]], headers: list[str], out: TextIO) -> None:
        table(rows, headers, out, headings=not getattr(self.args, "no_headings", False))

    def warn(self, r: Any) -> None:
        """A reply's warning (e.g. overcommitted thin disks), on stderr."""
        if isinstance(r, dict) and r.get("warning"):
            print(f"vdctl: warning: {r['warning']}", file=sys.stderr)

    def emit_json(self, obj: Any) -> None:
        json.dump(obj, self.out, indent=2, sort_keys=False)
        self.out.write("\n")

    async def status(self) -> int:
        r = await self.c.call("status")
        self.emit_json(r) if self.json else kv(r, self.out)
        return 0

    async def check(self) -> int:
        r = await self.c.call("check")
        if self.json:
            self.emit_json(r)
        else:
            for p in r["problems"]:
                self.out.write(f"{p['level']}: {p['message']}\n")
            verdict = "clean" if r["ok"] else "CORRUPT"
            self.out.write(f"check: {verdict}: {r['containers']} containers, {r['disks']} disks, "
                           f"{r['extents']} extents, {r['errors']} errors, {r['leaks']} leaks\n")
        return 0 if r["ok"] else 1

    async def container_add(self) -> int:
        force = self.args.force
        if force:
            print(f"vdctl: --force: making sure nothing else uses {self.args.path} (this may "
                  "take a while)", file=sys.stderr)
        # (--force watches the owner's heartbeat: up to a few of its leases)
        extra = {"force": True} if force else {}
        if self.args.shared:
            extra["shared"] = True
        r = await self.c.call("container.add", timeout=DEFAULT_TIMEOUT + (3600 if force else 0),
                              name=self.args.name, path=self.args.path, size=self.args.size,
                              **extra)
        self._container_out(r)
        return 0

    async def container_set(self) -> int:
        r = await self.c.call("container.set", name=self.args.name, shared=self.args.shared)
        self._container_out(r)
        return 0

    def _container_out(self, r: dict[str, Any]) -> None:
        self.emit_json(r) if self.json else kv(r, self.out)

    async def container_ls(self) -> int:
        rows = await self.c.call("container.ls")
        if self.json:
            self.emit_json(rows)
            return 0
        self._table([[r["name"], str(r["lun"]), format_size(r["size"]), format_size(r["used"]),
                 format_size(r["free"]), pct(r["used"], r["size"]), r["state"],
                 str(r.get("label", "-")).split(" ", 1)[0].rstrip(":"),
                 str(r.get("errors") or "-"), r["path"]]
                for r in rows],
               ["NAME", "LUN", "SIZE", "USED", "FREE", "USE%", "STATE", "LABEL", "ERRORS",
                "PATH"],
               self.out)
        return 0

    async def container_info(self) -> int:
        r = await self.c.call("container.info", name=self.args.name)
        if self.json:
            self.emit_json(r)
            return 0
        kv(r, self.out)
        for d in r["disks"]:
            self.out.write(f"  disk {shown(d['name'])}: {d['bytes']} bytes\n")
        return 0

    async def container_rm(self) -> int:
        r = await self.c.call("container.rm", name=self.args.name)
        if self.json:
            self.emit_json(r)
        print(f"container {r['name']} removed; {r['path']} was left in place",
              file=sys.stderr)
        return 0

    async def disk_create(self) -> int:
        a = self.args
        if a.size == 0:
            raise P.invalid("--size must be more than 0 bytes")
        uid, gid, mode = perm_args(a)
        r = await self.c.call("disk.create", name=a.name, size=a.size, thick=a.thick,
                              segment_size=a.segment_size, container=a.container,
                              **({"uid": uid, "gid": gid, "mode": mode}
                                 if (uid, gid, mode) != (None, None, None) else {}))
        self.warn(r)
        self.emit_json(r) if self.json else kv(perms_shown(r), self.out)
        return 0

    async def disk_ls(self) -> int:
        rows = await self.c.call("disk.ls")
        if self.json:
            self.emit_json(rows)
            return 0
        self._table([[disk_shown(r), str(r["size"]), format_size(r["size"]), r["provisioning"],
                 format_size(r["allocated"]), str(r["extents"]), r["container"] or "-"]
                for r in rows],
               ["NAME", "BYTES", "SIZE", "TYPE", "ALLOCATED", "EXTENTS", "PINNED"], self.out)
        return 0

    async def disk_rename(self) -> int:
        r = await self.c.call("disk.rename", name=self.args.name, new=self.args.new)
        self._disk_out(r)
        return 0

    async def disk_set(self) -> int:
        a = self.args
        limits = {k: getattr(a, f"{k}_limit") for k in
                  ("iops", "bps", "read_iops", "read_bps", "write_iops", "write_bps")
                  if getattr(a, f"{k}_limit") is not None}
        uid, gid, mode = perm_args(a)
        if not limits and (uid, gid, mode) == (None, None, None):
            raise P.invalid("give at least one limit (--iops-limit, --bps-limit, "
                            "--read-iops-limit, ...) or --owner, --group, --mode")
        if (uid, gid, mode) != (None, None, None):
            r = await self.c.call("disk.perms", name=a.name, uid=uid, gid=gid, mode=mode)
        if limits:
            r = await self.c.call("disk.set", name=a.name, limits=limits)
        self._disk_out(r)
        return 0

    async def disk_info(self) -> int:
        r = await self.c.call("disk.info", name=self.args.name)
        self._disk_out(r)
        return 0

    def _disk_out(self, r: dict[str, Any]) -> None:
        if self.json:
            self.emit_json(r)
            return
        kv({**perms_shown(r), "qos": qos_line(r.get("qos") or {})}, self.out)
        for p in r.get("placement", []):
            self.out.write(f"  on {p['container']}: {p['bytes']} bytes\n")

    async def disk_map(self) -> int:
        start: int | None = 0
        first = True
        while start is not None:
            page = await self.c.call("disk.map", name=self.args.name, start=start)
            luns = {int(k): v for k, v in page["containers"].items()}
            if first and self.json:
                self.out.write(json.dumps({"name": page["name"], "size": page["size"],
                                           "epoch": page["epoch"]})[:-1] + ', "entries": [')
            elif first and not getattr(self.args, "no_headings", False):
                self.out.write(f"{'VSTART':>16}  {'LENGTH':>14}  {'CONTAINER':<12}  "
                               f"{'OFFSET':>16}  STATE\n")
            for vstart, length, lun, offset, flags in page["rows"]:
                mapped = lun != NO_LUN
                if self.json:
                    row = {"vstart": vstart, "length": length,
                           "container": luns.get(lun) if mapped else None,
                           "lun": lun if mapped else None, "offset": offset if mapped else None,
                           "state": state_names(flags) or ["valid"]}
                    self.out.write(("\n  " if first else ",\n  ") + json.dumps(row))
                else:
                    st = ",".join(state_names(flags)) or "valid"
                    self.out.write(f"{vstart:>16}  {length:>14}  "
                                   f"{(luns.get(lun, '?') if mapped else '-'):<12}  "
                                   f"{(offset if mapped else '-'):>16}  {st}\n")
                first = False
            start = page["next"]
        if self.json:
            self.out.write("\n]}\n")
        return 0

    async def disk_resize(self) -> int:
        sign, amount = self.args.size
        size = amount
        if sign:
            cur = (await self.c.call("disk.info", name=self.args.name))["size"]
            size = cur + amount if sign == "+" else cur - amount
            if size < 0:
                raise P.invalid(f"cannot shrink {self.args.name!r} ({cur} bytes) by {amount}")
        r = await self.c.call("disk.resize", name=self.args.name, size=size,
                              allow_shrink=self.args.allow_shrink)
        self.warn(r)
        self.emit_json(r) if self.json else kv(r, self.out)
        return 0

    async def disk_rm(self) -> int:
        r = await self.c.call("disk.rm", name=self.args.name)
        if self.json:
            self.emit_json(r)
        print(f"disk {shown(r['name'])} removed ({r['freed']} bytes freed)",
              file=sys.stderr)
        return 0

    async def _follow(self, job: dict[str, Any]) -> int:
        """--no-wait: print the job id. Else show its progress on stderr (percent,
        bytes, rate, ETA) until it ends; exit 0 if it finished, 1 if not."""
        if self.args.no_wait:
            self.emit_json(job) if self.json else self.out.write(f"{job['id']}\n")
            return 0
        from tqdm import tqdm

        what = f"{job['kind']} {shown(job['disk']) if job['disk'] else job['from']}"
        bar = tqdm(total=job.get("total") or 0, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=what, file=sys.stderr, disable=None, leave=True)
        try:
            while True:
                rows = {j["id"]: j for j in await self.c.call("job.ls")}
                cur = rows.get(job["id"])
                if cur is None or cur["state"] != "running":
                    break
                if cur["total"] is not None:
                    bar.total = cur["total"]
                    bar.n = cur["done"]
                    bar.refresh()
                await trio.sleep(JOB_POLL)
            if cur is not None and cur["state"] == "done":
                bar.n = bar.total or 0
                bar.refresh()
        finally:
            bar.close()
        if cur is None:
            raise P.RemoteError(P.E_NOT_FOUND, f"job {job['id']} is gone")
        if self.json:
            self.emit_json(cur)
        if cur["state"] != "done":
            print(f"vdctl: error: job {cur['id']} {cur['state']}: {cur['message']}",
                  file=sys.stderr)
            return 1
        print(f"job {cur['id']}: {what} done", file=sys.stderr)
        return 0

    async def disk_migrate(self) -> int:
        return await self._follow(await self.c.call("disk.migrate", name=self.args.name,
                                                    to=self.args.to))

    async def container_drain(self) -> int:
        return await self._follow(await self.c.call("container.drain", name=self.args.name,
                                                    to=self.args.to))

    async def container_fail(self) -> int:
        r = await self.c.call("container.fail", name=self.args.name)
        self.emit_json(r) if self.json else kv(r, self.out)
        return 0

    async def container_restore(self) -> int:
        extra = {"relabel": True} if self.args.relabel else {}
        r = await self.c.call("container.restore", name=self.args.name, **extra)
        self.emit_json(r) if self.json else kv(r, self.out)
        return 0

    async def disk_clone(self) -> int:
        r = await self.c.call("disk.clone", name=self.args.snap, new=self.args.new)
        self.emit_json(r) if self.json else kv(r, self.out)
        return 0

    async def snap_create(self) -> int:
        r = await self.c.call("snap.create", name=self.args.name)
        self.emit_json(r) if self.json else kv(r, self.out)
        return 0

    async def snap_ls(self) -> int:
        rows = await self.c.call("snap.ls", name=self.args.name)
        if self.json:
            self.emit_json(rows)
            return 0
        self._table([[shown(r["name"]),
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"])),
                      format_size(r["size"]), format_size(r["held"]),
                      ",".join(shown(c) for c in r["clones"]) or "-"] for r in rows],
                    ["NAME", "CREATED", "SIZE", "HELD", "CLONES"], self.out)
        return 0

    async def snap_rm(self) -> int:
        r = await self.c.call("snap.rm", name=self.args.name)
        if self.json:
            self.emit_json(r)
        print(f"snapshot {shown(r['name'])} removed ({format_size(r['held'])} freed)",
              file=sys.stderr)
        return 0

    async def snap_rollback(self) -> int:
        r = await self.c.call("snap.rollback", name=self.args.name, force=self.args.force)
        newer = r.pop("newer_snapshots", None) if not self.json else None
        self.emit_json(r) if self.json else kv(r, self.out)
        if newer:
            print(f"vdctl: {r['name']} rolled back to {self.args.name}; the newer snapshots "
                  f"{', '.join(newer)} are kept as they were (remove them with vdctl snap "
                  "rm if they are not wanted)", file=sys.stderr)
        return 0

    async def snap_diff(self) -> int:
        return await cli_backup.snap_diff(self)

    async def disk_export_diff(self) -> int:
        return await cli_backup.disk_export_diff(self)

    async def disk_import_diff(self) -> int:
        return await cli_backup.disk_import_diff(self)

    async def job_ls(self) -> int:
        rows = await self.c.call("job.ls")
        if self.json:
            self.emit_json(rows)
            return 0

        def progress(j: dict[str, Any]) -> str:
            if j["state"] != "running" or j["total"] is None:
                return "-"
            return f"{j['progress']:.1f}% of {format_size(j['total'])}"

        def rate(j: dict[str, Any]) -> str:
            return f"{format_size(j['rate'])}/s" if j.get("rate") else "-"

        self._table([[str(j["id"]), j["kind"], shown(j["disk"]) if j["disk"] else "-",
                 j["from"] or "-", j["to"] or "-", j["state"], progress(j), rate(j),
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j["started"]))]
                for j in rows],
               ["ID", "KIND", "DISK", "FROM", "TO", "STATE", "PROGRESS", "RATE", "STARTED"],
               self.out)
        return 0

    async def job_abort(self) -> int:
        r = await self.c.call("job.abort", id=self.args.id)
        self.emit_json(r) if self.json else kv(r, self.out)
        return 0

    async def agent_ls(self) -> int:
        rows = await self.c.call("agent.ls")
        if self.json:
            self.emit_json(rows)
            return 0
        self._table([[str(r["id"]), r["host"], r["mount"],
                 "connected" if r["connected"] else "disconnected", f"{r['lease_left']:.1f}s",
                 ",".join(shown(d) for d in r["disks"]) or "-"]
                for r in rows], ["ID", "HOST", "MOUNT", "STATE", "LEASE", "DISKS"], self.out)
        return 0


def controller_addr(args: argparse.Namespace) -> str:
    """--controller, else $VIRTFS_CONTROLLER (unless --state-dir), else the state
    dir's socket.

    Raises SecurityConfigError for a malformed $VIRTFS_CONTROLLER."""
    if getattr(args, "controller", None):
        return str(args.controller)
    env = os.environ.get("VIRTFS_CONTROLLER")
    if env and not getattr(args, "state_dir", None):
        try:
            parse_addr(env)
        except ValueError as e:
            raise SecurityConfigError(f"$VIRTFS_CONTROLLER: {e}") from None
        return env
    state_dir = getattr(args, "state_dir", None) or default_state_dir()
    return default_socket(os.path.abspath(state_dir))


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(rewrite_negative(argv))
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else 2
    out = out or sys.stdout
    try:
        addr = controller_addr(args)
        security = security_from_args(args, addr)
    except SecurityConfigError as e:
        print(f"vdctl: error: {e}", file=sys.stderr)
        return 2
    method_name = (args.noun if args.noun in ("status", "check")
                   else f"{args.noun}_{args.verb}".replace("-", "_"))

    async def run() -> int:
        async with open_controller(addr, role="admin", name="vdctl",
                                   security=security) as client:
            method: Callable[[], Any] = getattr(Cli(args, client, out), method_name)
            return int(await method())

    try:
        return trio.run(run)
    except BrokenPipeError:
        # the reader went away (vdctl ... | head): quietly, like other CLI tools
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except ConnectionLost as e:
        hint = "" if "connect" not in e.message else " (is virtfs-controller running?)"
        print(f"vdctl: error: {e.message}{hint}", file=sys.stderr)
        return 1
    except P.RemoteError as e:
        print(f"vdctl: error: {e.message}", file=sys.stderr)
        return 1
    except trio.TooSlowError:
        print("vdctl: error: the controller did not answer in time", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
