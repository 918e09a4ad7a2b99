"""vdctl: the admin CLI. Talks to the controller over its socket.

JSON goes to stdout, notices to stderr. Exit 0 on success, 1 on an error
(one line on stderr), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import trio

from . import __version__
from . import protocol as P
from .client import ConnectionLost, add_security_options, open_controller, security_from_args
from .protocol import NO_LUN, state_names
from .statedir import default_socket, default_state_dir
from .transport import SecurityConfigError, parse_addr
from .units import SIZE_HELP, SizeError, format_size, parse_size

_NEG = "neg:"  # argv rewrite so "disk resize d -1G" is not taken for an option


MAX_SIZE_ARG = (1 << 63) - 1  # what msgpack carries as a signed int


def size_arg(text: str) -> int:
    if text.startswith(_NEG):  # undo the argv rewrite so the message shows what was typed
        text = "-" + text[len(_NEG):]
    try:
        n = parse_size(text)
    except SizeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n > MAX_SIZE_ARG:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: too large")
    return n


def delta_arg(text: str) -> tuple[str, int]:
    """SIZE, +SIZE or -SIZE for resize."""
    sign = ""
    if text.startswith(_NEG):
        sign, text = "-", text[len(_NEG):]
    elif text[:1] in "+-":
        sign, text = text[0], text[1:]
    return sign, size_arg(text)


def addr_arg(text: str) -> str:
    """A controller address: unix:PATH or tcp://HOST:PORT (TLS and a token, see
    --token-file)."""
    try:
        parse_addr(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def path_arg(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("PATH must not be empty")
    return os.path.abspath(text)


def _globals(parser: argparse.ArgumentParser, default: Any) -> None:
    g = parser.add_argument_group("global options")
    g.add_argument("--state-dir", default=default,
                   help="the controller's state dir (its socket is STATE_DIR/controller.sock; "
                   "default $VIRTFS_STATE_DIR or ~/.local/state/virtfs)")
    g.add_argument("--controller", metavar="ADDR", default=default, type=addr_arg,
                   help="the controller's address, unix:PATH or tcp://HOST:PORT "
                   "(default $VIRTFS_CONTROLLER, else the state dir's socket)")
    add_security_options(g, default)
    g.add_argument("--format", choices=("table", "json"), default=default,
                   help="output format (default table)")
    g.add_argument("-H", "--no-headings", action="store_true", default=default,
                   help="print tables without their heading line (for scripts)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vdctl",
        description="Manage virtfs storage containers and virtual disks.",
        epilog=f"Sizes: {SIZE_HELP}. "
        "Global options may also follow the verb, e.g. 'vdctl disk ls --format json'.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _globals(p, None)
    nouns = p.add_subparsers(dest="noun", metavar="NOUN", required=True)

    def verb(sub: Any, name: str, help_: str) -> argparse.ArgumentParser:
        vp = sub.add_parser(name, help=help_, description=help_)
        _globals(vp, argparse.SUPPRESS)
        return vp

    verb(nouns, "status", "show the controller's status")
    verb(nouns, "check", "verify the persistent table (exit 1 on corruption)")

    c = nouns.add_parser("container", help="storage containers (backing files or devices)")
    cv = c.add_subparsers(dest="verb", metavar="VERB", required=True)
    a = verb(cv, "add", "add a container: an existing file or block device, or a new sparse "
             "file of --size")
    a.add_argument("name", help="container name (letters, digits, . _ + -)")
    a.add_argument("path", type=path_arg,
                   help="backing file or block device (made absolute); a new sparse file "
                   "with --size")
    a.add_argument("--size", type=size_arg,
                   help="create a sparse file of this size if PATH does not exist; with an "
                   "existing file, use only its first SIZE bytes")
    verb(cv, "ls", "list containers with usage")
    verb(cv, "info", "show one container and the disks on it").add_argument("name")
    verb(cv, "rm", "remove an empty container (the file itself is left in place)"
         ).add_argument("name")
    dr = verb(cv, "drain", "move everything off a container, while disks are in use "
              "(new space avoids it meanwhile)")
    dr.add_argument("name")
    dr.add_argument("--to", metavar="CONTAINER", help="move it all to this container "
                    "(default: wherever new space would go)")
    dr.add_argument("--no-wait", action="store_true", help="print the job id and return")
    verb(cv, "fail", "mark a container failed: I/O on its data fails at once with EIO"
         ).add_argument("name")
    verb(cv, "restore", "clear a failed or suspect container: its data is used again"
         ).add_argument("name")

    d = nouns.add_parser("disk", help="virtual disks")
    dv = d.add_subparsers(dest="verb", metavar="VERB", required=True)
    cr = verb(dv, "create", "create a disk (thin unless --thick)")
    cr.add_argument("name", help="disk name: any file name (up to 255 bytes of UTF-8) "
                    "without '/' or '@'")
    cr.add_argument("--size", type=size_arg, required=True, metavar="SIZE",
                    help="any byte size, e.g. 12345, 10G, 1.5T")
    cr.add_argument("--thick", action="store_true", help="allocate all space now")
    cr.add_argument("--segment-size", type=size_arg, metavar="SIZE",
                    help="allocation unit for thin disks (default 4M, multiple of 4K)")
    cr.add_argument("--container", help="allocate only on this container")
    verb(dv, "ls", "list disks")
    verb(dv, "info", "show one disk").add_argument("name")
    verb(dv, "map", "show a disk's segment map: entries and their states").add_argument("name")
    rs = verb(dv, "resize", "set a disk's size, or grow/shrink it by +SIZE/-SIZE")
    rs.add_argument("name")
    rs.add_argument("size", type=delta_arg, metavar="SIZE|+SIZE|-SIZE",
                    help="new size, or a change of it (e.g. 20G, +1G, -512M)")
    rs.add_argument("--allow-shrink", action="store_true", help="permit shrinking (data past "
                    "the new end is discarded)")
    verb(dv, "rm", "remove a disk and free its space (refused while an agent has it open)"
         ).add_argument("name")
    mg = verb(dv, "migrate", "move a disk to another container while it is in use")
    mg.add_argument("name")
    mg.add_argument("--to", metavar="CONTAINER", required=True, help="target container")
    mg.add_argument("--no-wait", action="store_true", help="print the job id and return")

    verb(dv, "clone", "make a writable thin disk from a snapshot, sharing its storage"
         ).add_argument("snap", metavar="NAME@SNAP")
    dv.choices["clone"].add_argument("new", metavar="NEWNAME")

    sn = nouns.add_parser("snap", help="snapshots of disks (NAME@SNAP, read-only)")
    sv = sn.add_subparsers(dest="verb", metavar="VERB", required=True)
    verb(sv, "create", "snapshot a disk (in use or not): time independent of its size"
         ).add_argument("name", metavar="NAME@SNAP")
    verb(sv, "ls", "list a disk's snapshots (created, size, bytes only the snapshot holds)"
         ).add_argument("name", metavar="NAME")
    verb(sv, "rm", "remove a snapshot: frees what nothing else maps"
         ).add_argument("name", metavar="NAME@SNAP")
    rb = verb(sv, "rollback", "make a disk's content the snapshot's (refused while the disk "
              "is open anywhere, unless --force)")
    rb.add_argument("name", metavar="NAME@SNAP")
    rb.add_argument("--force", action="store_true", help="roll back under the agents that "
                    "have the disk open (they see the snapshot's content at once)")

    jb = nouns.add_parser("job", help="background data movement (migrate, drain)")
    jv = jb.add_subparsers(dest="verb", metavar="VERB", required=True)
    verb(jv, "ls", "list jobs: running ones with their progress, and recent ended ones")
    verb(jv, "abort", "stop a job; segments it is moving go back where they were"
         ).add_argument("id", type=int)

    ag = nouns.add_parser("agent", help="agents (virtfs-mount processes) the controller knows")
    agv = ag.add_subparsers(dest="verb", metavar="VERB", required=True)
    verb(agv, "ls", "list agents with their leases and open disks")
    return p


# ---------------------------------------------------------------- output


def shown(name: str) -> str:
    """A disk name as tables and messages print it: readable, and pasteable into a shell.

    Plain names print as they are; names with spaces or shell characters in single
    quotes (shlex.quote); names with control or other unprintable characters in bash's
    $'...' form with escapes. JSON output always gives the exact name.
    """
    if name.isprintable():
        return shlex.quote(name)
    out = []
    for c in name:
        if c == "'" or c == "\\":
            out.append("\\" + c)
        elif c.isprintable():
            out.append(c)
        else:
            code = ord(c)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
                       if code < 0x10000 else f"\\U{code:08x}")
    return "$'" + "".join(out) + "'"


def _table(rows: list[list[str]], headers: list[str], out: Any, headings: bool = True) -> None:
    widths = [len(h) for h in headers] if headings else [0] * len(headers)
    for r in rows:
        widths = [max(w, len(x)) for w, x in zip(widths, r, strict=True)]
    if headings:
        out.write("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()
                  + "\n")
    for r in rows:
        out.write("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)).rstrip() + "\n")


def _disk_shown(r: dict[str, Any]) -> str:
    """A disk's name for a table; one unlinked while open is marked (removed when the
    last agent closes it)."""
    if r.get("deleted") is not None:
        return f"{shown(r['deleted'])} (deleted, still open)"
    return shown(r["name"])


def _kv(d: dict[str, Any], out: Any) -> None:
    for k, v in d.items():
        if isinstance(v, list | dict):
            continue
        if k == "name" and isinstance(v, str):
            v = shown(v)
        elif v is None:
            v = "-"
        elif isinstance(v, bool):
            v = "yes" if v else "no"
        elif k in ("ctime", "mtime", "changed", "registered", "created") and isinstance(
                v, int | float):
            v = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v))
        elif k == "uptime":
            v = f"{v} s"
        if isinstance(v, int) and not isinstance(v, bool) and k in (
                "size", "used", "free", "allocated", "capacity", "segment_size",
                "journal_bytes"):
            v = f"{v} ({format_size(v)})"
        out.write(f"{k + ':':<15} {v}\n")


JOB_POLL = 0.5  # seconds between progress polls


def _pct(used: int, size: int) -> str:
    return f"{100 * used / size:.1f}%" if size else "-"


class Cli:
    def __init__(self, args: argparse.Namespace, client: Any, out: Any):
        self.args = args
        self.c = client
        self.out = out
        self.json = getattr(args, "format", None) == "json"

    def _table(self, rows: list[list[str]], headers: list[str], out: Any) -> None:
        _table(rows, headers, out, headings=not getattr(self.args, "no_headings", False))

    def warn(self, r: Any) -> None:
        """A reply's warning (e.g. overcommitted thin disks), on stderr."""
        if isinstance(r, dict) and r.get("warning"):
            print(f"vdctl: warning: {r['warning']}", file=sys.stderr)

    def emit_json(self, obj: Any) -> None:
        json.dump(obj, self.out, indent=2, sort_keys=False)
        self.out.write("\n")

    async def status(self) -> int:
        r = await self.c.call("status")
        self.emit_json(r) if self.json else _kv(r, self.out)
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
        r = await self.c.call("container.add", name=self.args.name, path=self.args.path,
                              size=self.args.size)
        self._container_out(r)
        return 0

    def _container_out(self, r: dict[str, Any]) -> None:
        self.emit_json(r) if self.json else _kv(r, self.out)

    async def container_ls(self) -> int:
        rows = await self.c.call("container.ls")
        if self.json:
            self.emit_json(rows)
            return 0
        self._table([[r["name"], str(r["lun"]), format_size(r["size"]), format_size(r["used"]),
                 format_size(r["free"]), _pct(r["used"], r["size"]), r["state"],
                 str(r.get("errors") or "-"), r["path"]]
                for r in rows],
               ["NAME", "LUN", "SIZE", "USED", "FREE", "USE%", "STATE", "ERRORS", "PATH"],
               self.out)
        return 0

    async def container_info(self) -> int:
        r = await self.c.call("container.info", name=self.args.name)
        if self.json:
            self.emit_json(r)
            return 0
        _kv(r, self.out)
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
        r = await self.c.call("disk.create", name=a.name, size=a.size, thick=a.thick,
                              segment_size=a.segment_size, container=a.container)
        self.warn(r)
        self.emit_json(r) if self.json else _kv(r, self.out)
        return 0

    async def disk_ls(self) -> int:
        rows = await self.c.call("disk.ls")
        if self.json:
            self.emit_json(rows)
            return 0
        self._table([[_disk_shown(r), str(r["size"]), format_size(r["size"]), r["provisioning"],
                 format_size(r["allocated"]), str(r["extents"]), r["container"] or "-"]
                for r in rows],
               ["NAME", "BYTES", "SIZE", "TYPE", "ALLOCATED", "EXTENTS", "PINNED"], self.out)
        return 0

    async def disk_info(self) -> int:
        r = await self.c.call("disk.info", name=self.args.name)
        if self.json:
            self.emit_json(r)
            return 0
        _kv(r, self.out)
        for p in r["placement"]:
            self.out.write(f"  on {p['container']}: {p['bytes']} bytes\n")
        return 0

    async def disk_map(self) -> int:
        start: int | None = 0
        first = True
        while start is not None:
            page = await self.c.call("disk.map", name=self.args.name, start=start)
            luns = {int(k): v for k, v in page["containers"].items()}
            if first and self.json:
                self.out.write(json.dumps({"name": page["name"], "size": page["size"],
                                           "epoch": page["epoch"]})[:-1] + ', "entries": [')
            elif first:
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
        self.emit_json(r) if self.json else _kv(r, self.out)
        return 0

    async def disk_rm(self) -> int:
        r = await self.c.call("disk.rm", name=self.args.name)
        if self.json:
            self.emit_json(r)
        print(f"disk {shown(r['name'])} removed ({r['allocated']} bytes freed)",
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
        self.emit_json(r) if self.json else _kv(r, self.out)
        return 0

    async def container_restore(self) -> int:
        r = await self.c.call("container.restore", name=self.args.name)
        self.emit_json(r) if self.json else _kv(r, self.out)
        return 0

    async def disk_clone(self) -> int:
        r = await self.c.call("disk.clone", name=self.args.snap, new=self.args.new)
        self.emit_json(r) if self.json else _kv(r, self.out)
        return 0

    async def snap_create(self) -> int:
        r = await self.c.call("snap.create", name=self.args.name)
        self.emit_json(r) if self.json else _kv(r, self.out)
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
        self.emit_json(r) if self.json else _kv(r, self.out)
        return 0

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
        self.emit_json(r) if self.json else _kv(r, self.out)
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


def _rewrite_negative(argv: list[str]) -> list[str]:
    return [_NEG + a[1:] if re.fullmatch(r"-\d[\d.]*[A-Za-z]*", a) else a for a in argv]


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


def main(argv: Sequence[str] | None = None, out: Any = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(_rewrite_negative(argv))
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else 2
    out = out or sys.stdout
    try:
        addr = controller_addr(args)
        security = security_from_args(args, addr)
    except SecurityConfigError as e:
        print(f"vdctl: error: {e}", file=sys.stderr)
        return 2
    method_name = args.noun if args.noun in ("status", "check") else f"{args.noun}_{args.verb}"

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
