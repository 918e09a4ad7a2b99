"""vdctl: the admin CLI. Talks to the controller over its socket.

The commands are here; the parser is cli_args, the table output cli_format.

JSON goes to stdout, notices to stderr. Exit 0 on success, 1 on an error
(one line on stderr), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import trio

from . import cli_disks
from . import protocol as P
from .cli_args import build_parser, misplaced_options, rewrite_negative
from .cli_format import kv, pct, shown, table
from .client import (
    DEFAULT_TIMEOUT,
    Client,
    ConnectionLost,
    open_controller,
    security_from_args,
)
from .statedir import default_socket, default_state_dir
from .transport import SecurityConfigError, split_addrs
from .units import format_rate, format_size

JOB_POLL = 0.5  # seconds between progress polls



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
        self.bytes = bool(getattr(args, "bytes", False))

    def sz(self, n: int, exact: bool = False) -> str:
        """A size for a table cell: units.format_size, or the exact byte count with
        --bytes (exact: never rounded, e.g. map offsets)."""
        return str(n) if self.bytes else format_size(n, exact)

    def said(self, n: int) -> str:
        """A size inside a message: "300M", or "314572800 bytes" with --bytes."""
        return f"{n} bytes" if self.bytes else format_size(n)

    def dry_arg(self) -> dict[str, bool]:
        """The dry_run argument of an op, when -n/--dry-run was given (else nothing,
        so a controller without it still serves the real op)."""
        return {"dry_run": True} if getattr(self.args, "dry_run", False) else {}

    def dry(self, r: dict[str, Any], line: str) -> int:
        """A dry run's answer r: JSON as it came, else line ("dry run: ... would ...;
        nothing was changed") on stdout. Exit status 0."""
        if self.json:
            self.emit_json(r)
        else:
            self.out.write(f"dry run: {line}; nothing was changed\n")
        return 0

    def kv_out(self, r: dict[str, Any]) -> None:
        """r as key: value lines (cli_format.kv; sizes per --bytes)."""
        kv(r, self.out, exact_bytes=self.bytes)

    def table_out(self, rows: list[list[str]], headers: list[str], out: TextIO) -> None:
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
        if self.json:
            self.emit_json(r)
            return 0
        group = r.pop("group", None)
        self.kv_out(r)
        if group is not None:  # a controller group's leader (docs/ha.md)
            head = group.get("head") or {}
            self.out.write(f"group:          {group['name']} (etcd {group['etcd']})\n"
                           f"leader:         {group['leader']} (term {group['term']})\n"
                           f"journal head:   seq {head.get('seq', 0)} (moved by term "
                           f"{head.get('term', '-')})\n")
            at = head.get("seq", 0)
            self.table_out([[str(m.get("id")), str(m.get("address")), str(m.get("role")),
                          "-" if m.get("seq") is None else str(at - int(m["seq"])),
                          time.strftime("%Y-%m-%d %H:%M:%S",
                                        time.localtime(float(m.get("since") or 0)))]
                         for m in group["members"]],
                        ["MEMBER", "ADDRESS", "ROLE", "LAG", "SINCE"], self.out)
        return 0

    async def group_step_down(self) -> int:
        r = await self.c.call("group.step_down", to=self.args.to)
        if self.json:
            self.emit_json(r)
        else:
            print(f"vdctl: {r['leader']} steps down for {r['to'] or 'any standby'}; clients "
                  "go on to the new leader", file=sys.stderr)
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
        self.emit_json(r) if self.json else self.kv_out(r)

    async def container_ls(self) -> int:
        rows = await self.c.call("container.ls")
        if self.json:
            self.emit_json(rows)
            return 0
        self.table_out([[r["name"], str(r["lun"]), self.sz(r["size"]), self.sz(r["used"]),
                 self.sz(r["free"]), pct(r["used"], r["size"]), r["state"],
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
        self.kv_out(r)
        for d in r["disks"]:
            self.out.write(f"  disk {shown(d['name'])}: {self.sz(d['bytes'])}\n")
        return 0

    async def container_rm(self) -> int:
        r = await self.c.call("container.rm", name=self.args.name, **self.dry_arg())
        if r.get("dry_run"):
            return self.dry(r, f"container {r['name']} would be removed; {r['path']} would "
                            "be left in place")
        if self.json:
            self.emit_json(r)
        print(f"container {r['name']} removed; {r['path']} was left in place",
              file=sys.stderr)
        return 0

    async def disk_create(self) -> int:
        return await cli_disks.disk_create(self)

    async def disk_ls(self) -> int:
        return await cli_disks.disk_ls(self)

    async def disk_rename(self) -> int:
        return await cli_disks.disk_rename(self)

    async def disk_set(self) -> int:
        return await cli_disks.disk_set(self)

    async def disk_info(self) -> int:
        return await cli_disks.disk_info(self)

    async def disk_map(self) -> int:
        return await cli_disks.disk_map(self)

    async def disk_resize(self) -> int:
        return await cli_disks.disk_resize(self)

    async def disk_rm(self) -> int:
        return await cli_disks.disk_rm(self)

    async def _follow(self, job: dict[str, Any]) -> int:
        """--no-wait: print the job id. Else show its progress on stderr (percent,
        bytes, rate, ETA) until it ends; exit 0 if it finished, 1 if not."""
        if self.args.no_wait:
            self.emit_json(job) if self.json else self.out.write(f"{job['id']}\n")
            return 0
        what = f"{job['kind']} {shown(job['disk']) if job['disk'] else job['from']}"
        from .progress import size_bar  # tqdm: imported by the verbs that show a bar

        bar = size_bar(job.get("total") or 0, what)
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
        if self.args.dry_run:
            return self._plan(await self.c.call("disk.migrate", name=self.args.name,
                                                 to=self.args.to, dry_run=True))
        return await self._follow(await self.c.call("disk.migrate", name=self.args.name,
                                                    to=self.args.to, rate=self.args.rate))

    async def container_drain(self) -> int:
        if self.args.dry_run:
            return self._plan(await self.c.call("container.drain", name=self.args.name,
                                                 to=self.args.to, dry_run=True))
        return await self._follow(await self.c.call("container.drain", name=self.args.name,
                                                    to=self.args.to, rate=self.args.rate))

    def _plan(self, plan: dict[str, Any]) -> int:
        """Print a dry run's plan (controller/jobplan.py): a line per disk with its live
        and shared (snapshot and clone storage) bytes, then the totals and where it goes."""
        if self.json:
            self.emit_json(plan)
            return 0
        rows = [[r["disk"], format_size(r["live"]), format_size(r["shared"])]
                for r in plan["disks"]]
        table(rows, ["DISK", "LIVE", "SHARED"], self.out)
        to = plan["to"] or "wherever new space goes"
        what = f"disk {plan['disks'][0]['disk']}" if plan["kind"] == "migrate" and rows \
            else plan["from"] or "-"
        self.out.write(f"would move {format_size(plan['total'])} "
                       f"({format_size(plan['live'])} live data, "
                       f"{format_size(plan['shared'])} snapshot and clone storage) of {what} to "
                       f"{to}; nothing was changed\n")
        return 0

    async def container_fail(self) -> int:
        r = await self.c.call("container.fail", name=self.args.name)
        self.emit_json(r) if self.json else self.kv_out(r)
        return 0

    async def container_restore(self) -> int:
        extra = {"relabel": True} if self.args.relabel else {}
        r = await self.c.call("container.restore", name=self.args.name, **extra)
        self.emit_json(r) if self.json else self.kv_out(r)
        return 0

    async def disk_clone(self) -> int:
        return await cli_disks.disk_clone(self)

    async def snap_create(self) -> int:
        r = await self.c.call("snap.create", name=self.args.name)
        self.emit_json(r) if self.json else self.kv_out(r)
        return 0

    async def snap_ls(self) -> int:
        rows = await self.c.call("snap.ls", name=self.args.name)
        if self.json:
            self.emit_json(rows)
            return 0
        # a snapshot whose removal a crash cut short: the controller finishes it
        self.table_out([[shown(r["name"]) + (" (removing)" if r.get("removing") else ""),
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"])),
                      self.sz(r["size"]), self.sz(r["held"]),
                      ",".join(shown(c) for c in r["clones"]) or "-"] for r in rows],
                    ["NAME", "CREATED", "SIZE", "HELD", "CLONES"], self.out)
        return 0

    async def snap_rm(self) -> int:
        r = await self.c.call("snap.rm", name=self.args.name, **self.dry_arg())
        if r.get("dry_run"):
            return self.dry(r, f"snapshot {shown(r['name'])} would be removed: "
                            f"{self.said(r['held'])} of storage freed")
        if self.json:
            self.emit_json(r)
        print(f"snapshot {shown(r['name'])} removed ({self.said(r['held'])} freed)",
              file=sys.stderr)
        return 0

    async def snap_rollback(self) -> int:
        r = await self.c.call("snap.rollback", name=self.args.name, force=self.args.force,
                              **self.dry_arg())
        if r.get("dry_run"):
            kept = ", ".join(shown(n) for n in r["newer_snapshots"])
            return self.dry(r, f"{shown(r['name'])} would be rolled back to "
                            f"{shown(self.args.name)}: size {self.said(r['old_size'])} -> "
                            f"{self.said(r['size'])}, {self.said(r['freed'])} of storage "
                            "freed, " + (f"newer snapshots kept: {kept}" if kept
                                         else "no newer snapshots"))
        newer = r.pop("newer_snapshots", None) if not self.json else None
        self.emit_json(r) if self.json else self.kv_out(r)
        if newer:
            print(f"vdctl: {r['name']} rolled back to {self.args.name}; the newer snapshots "
                  f"{', '.join(newer)} are kept as they were (remove them with vdctl snap "
                  "rm if they are not wanted)", file=sys.stderr)
        return 0

    async def snap_diff(self) -> int:
        from . import cli_backup  # (with tqdm: a bar) imported by its three verbs only

        return await cli_backup.snap_diff(self)

    async def disk_export_diff(self) -> int:
        from . import cli_backup  # (with tqdm: a bar) imported by its three verbs only

        return await cli_backup.disk_export_diff(self)

    async def disk_import_diff(self) -> int:
        from . import cli_backup  # (with tqdm: a bar) imported by its three verbs only

        return await cli_backup.disk_import_diff(self)

    async def job_ls(self) -> int:
        rows = await self.c.call("job.ls")
        if self.json:
            self.emit_json(rows)
            return 0

        def progress(j: dict[str, Any]) -> str:
            if j["state"] != "running" or j["total"] is None:
                return "-"
            return f"{j['progress']:.1f}% of {self.sz(j['total'])}"

        def rate(j: dict[str, Any]) -> str:
            if not j.get("rate"):
                return "-"
            return f"{round(j['rate'])}/s" if self.bytes else format_rate(j["rate"])

        def limit(j: dict[str, Any]) -> str:
            if not j.get("rate_limit"):
                return "-"
            r = j["rate_limit"]
            return f"{r}/s" if self.bytes else format_rate(r)

        self.table_out([[str(j["id"]), j["kind"], shown(j["disk"]) if j["disk"] else "-",
                 j["from"] or "-", j["to"] or "-", j["state"], progress(j), rate(j), limit(j),
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j["started"]))]
                for j in rows],
               ["ID", "KIND", "DISK", "FROM", "TO", "STATE", "PROGRESS", "RATE", "LIMIT",
                "STARTED"],
               self.out)
        return 0

    async def job_abort(self) -> int:
        r = await self.c.call("job.abort", id=self.args.id)
        self.emit_json(r) if self.json else self.kv_out(r)
        return 0

    async def agent_ls(self) -> int:
        rows = await self.c.call("agent.ls")
        if self.json:
            self.emit_json(rows)
            return 0
        self.table_out([[str(r["id"]), r["host"], r["mount"],
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
            split_addrs(env)
        except ValueError as e:
            raise SecurityConfigError(f"$VIRTFS_CONTROLLER: {e}") from None
        return env
    state_dir = getattr(args, "state_dir", None) or default_state_dir()
    return default_socket(os.path.abspath(state_dir))


def _parses(parser: argparse.ArgumentParser, argv: list[str]) -> bool:
    """Whether argv parses, quietly (no usage screen)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(
                io.StringIO()):
            parser.parse_args(rewrite_negative(argv))
    except SystemExit:
        return False
    return True


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    wrong = misplaced_options(parser, argv)
    if wrong is not None and not _parses(parser, argv):
        print(f"vdctl: error: {wrong}", file=sys.stderr)
        return 2
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
