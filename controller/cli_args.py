"""vdctl's command line: the parser (nouns, verbs, options) and its argument types."""

from __future__ import annotations

import argparse
import os
import re
import shlex
from collections.abc import Callable
from typing import Any

from . import __version__
from .client import add_security_options
from .protocol import SNAP_SEP
from .transport import split_addrs
from .units import SIZE_HELP, SizeError, parse_size

_NEG = "neg:"  # argv rewrite so "disk resize d -1G" is not taken for an option


MAX_SIZE_ARG = (1 << 63) - 1  # what msgpack carries as a signed int


def limit_arg(parse: Callable[[str], int]) -> Callable[[str], int]:
    """A QoS limit: 0 or "none" (no limit), else parse(text) > 0."""
    def limit(text: str) -> int:
        if text.lower() in ("none", "0"):
            return 0
        try:
            n = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid limit {text!r}") from None
        if n < 0:
            raise argparse.ArgumentTypeError(f"invalid limit {text!r}: negative")
        return n
    return limit


def perm_options(p: argparse.ArgumentParser) -> None:
    """--owner, --group and --mode of disk create and disk set (docs/permissions.md);
    checked by the command (controller/perms.py), so a bad one is one line."""
    p.add_argument("--owner", metavar="USER", help="the disk's owner: a user name or uid "
                   "(default: whoever mounts it)")
    p.add_argument("--group", metavar="GROUP", help="the disk's group: a group name or "
                   "gid (default: the mounting user's)")
    p.add_argument("--mode", metavar="MODE", help="the disk's permission bits, in octal "
                   "as chmod takes them, e.g. 0640 (default 0644)")


def size_arg(text: str) -> int:
    """A size argument in bytes (units.parse_size); ArgumentTypeError if it is not one."""
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
    """A controller address, unix:PATH or tcp://HOST:PORT (TLS and a token, see
    --token-file), or a group's addresses separated by commas (docs/ha.md)."""
    try:
        split_addrs(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def path_arg(text: str) -> str:
    """A non-empty path, made absolute (the controller resolves none itself)."""
    if not text:
        raise argparse.ArgumentTypeError("PATH must not be empty")
    return os.path.abspath(text)


def _globals(parser: argparse.ArgumentParser, default: Any) -> None:
    g = parser.add_argument_group("global options")
    g.add_argument("--state-dir", default=default,
                   help="the controller's state dir (its socket is STATE_DIR/controller.sock; "
                   "default $VIRTFS_STATE_DIR or ~/.local/state/virtfs)")
    g.add_argument("--controller", metavar="ADDR", default=default, type=addr_arg,
                   help="the controller's address, unix:PATH or tcp://HOST:PORT, or a "
                   "group's addresses separated by commas (vdctl asks the leader) "
                   "(default $VIRTFS_CONTROLLER, else the state dir's socket)")
    add_security_options(g, default)
    g.add_argument("--format", choices=("table", "json"), default=default,
                   help="output format (default table)")
    g.add_argument("--bytes", action="store_true", default=default,
                   help="print sizes in tables and messages as exact byte counts (default: "
                   "300M, 1.5G, ~1.3G when rounded; --format json always gives bytes)")
    g.add_argument("-H", "--no-headings", action="store_true", default=default,
                   help="print tables without their heading line (for scripts)")


def dry_run_option(vp: argparse.ArgumentParser) -> None:
    """-n/--dry-run on a verb that changes or removes things (as zfs destroy -n)."""
    vp.add_argument("-n", "--dry-run", action="store_true",
                    help="print what would happen (bytes freed, what is cut off, "
                    "snapshots kept) and change nothing")


def build_parser() -> argparse.ArgumentParser:
    """vdctl's parser: NOUN VERB [args], global options before or after the verb."""
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
    a.add_argument("--force", action="store_true",
                   help="take over a file or device that another virtfs installation "
                   "labelled (once its controller's heartbeat stands still), or one that "
                   "holds a file system, partition table or other signature (wiped)")
    a.add_argument("--shared", action="store_true",
                   help="shared between hosts (a LUN, NFS): agents do its I/O with O_DIRECT, "
                   "so a fenced host has no dirty pages of it left (docs/fencing.md)")
    cs = verb(cv, "set", "change a container's settings")
    cs.add_argument("name")
    sh = cs.add_mutually_exclusive_group(required=True)
    sh.add_argument("--shared", dest="shared", action="store_true", default=None,
                    help="agents do its I/O with O_DIRECT from now on")
    sh.add_argument("--no-shared", dest="shared", action="store_false",
                    help="agents go back to the host page cache for it")
    verb(cv, "ls", "list containers with usage")
    verb(cv, "info", "show one container and the disks on it").add_argument("name")
    crm = verb(cv, "rm", "remove an empty container (the file itself is left in place)")
    crm.add_argument("name")
    dry_run_option(crm)
    dr = verb(cv, "drain", "move everything off a container, while disks are in use "
              "(new space avoids it meanwhile)")
    dr.add_argument("name")
    dr.add_argument("--to", metavar="CONTAINER", help="move it all to this container "
                    "(default: wherever new space would go)")
    dr.add_argument("--no-wait", action="store_true", help="print the job id and return")
    dr.add_argument("-n", "--dry-run", action="store_true", help="print what would move "
                    "(live data and snapshot/clone storage, per disk) and change nothing")
    dr.add_argument("--rate", type=size_arg, metavar="SIZE", help="limit the copy to SIZE "
                    "bytes per second (50M; 0: no limit; default: the controller's "
                    "--copy-rate)")
    verb(cv, "fail", "mark a container failed: I/O on its data fails at once with EIO"
         ).add_argument("name")
    rs_ = verb(cv, "restore", "clear a failed or suspect container: its data is used again")
    rs_.add_argument("name")
    rs_.add_argument("--relabel", action="store_true",
                     help="write its label again where it is missing or damaged (only if "
                     "PATH is the right file or device: docs/labels.md)")

    d = nouns.add_parser("disk", help="virtual disks")
    dv = d.add_subparsers(dest="verb", metavar="VERB", required=True)
    cr = verb(dv, "create", "create a disk (thin unless --thick)")
    cr.add_argument("name", help="disk name: any file name (up to 255 bytes of UTF-8) "
                    f"without '/' or {SNAP_SEP!r}")
    cr.add_argument("--size", type=size_arg, required=True, metavar="SIZE",
                    help="any byte size, e.g. 12345, 10G, 1.5T")
    cr.add_argument("--thick", action="store_true", help="allocate all space now")
    cr.add_argument("--segment-size", type=size_arg, metavar="SIZE",
                    help="allocation unit for thin disks (default 4M, multiple of 4K)")
    cr.add_argument("--container", help="allocate only on this container")
    perm_options(cr)
    verb(dv, "ls", "list disks")
    verb(dv, "info", "show one disk or snapshot (NAME@SNAP)").add_argument("name")
    verb(dv, "map", "show a disk's or snapshot's (NAME@SNAP) segment map: entries and "
         "their states").add_argument("name")
    rs = verb(dv, "resize", "set a disk's size, or grow/shrink it by +SIZE/-SIZE")
    rs.add_argument("name")
    rs.add_argument("size", type=delta_arg, metavar="SIZE|+SIZE|-SIZE",
                    help="new size, or a change of it (e.g. 20G, +1G, -512M)")
    rs.add_argument("--allow-shrink", action="store_true", help="permit shrinking (data past "
                    "the new end is discarded)")
    dry_run_option(rs)
    drm = verb(dv, "rm", "remove a disk and free its space (refused while an agent has it "
               "open)")
    drm.add_argument("name")
    dry_run_option(drm)
    mg = verb(dv, "migrate", "move a disk to another container while it is in use")
    mg.add_argument("name")
    mg.add_argument("--to", metavar="CONTAINER", required=True, help="target container")
    mg.add_argument("--no-wait", action="store_true", help="print the job id and return")
    mg.add_argument("-n", "--dry-run", action="store_true", help="print what would move "
                    "(live data and snapshot/clone storage) and change nothing")
    mg.add_argument("--rate", type=size_arg, metavar="SIZE", help="limit the copy to SIZE "
                    "bytes per second (50M; 0: no limit; default: the controller's "
                    "--copy-rate)")

    rn = verb(dv, "rename", "rename a disk, in use or not (agents see the new name at "
              "once; snapshots follow it)")
    rn.add_argument("name")
    rn.add_argument("new", metavar="NEWNAME")
    st = verb(dv, "set", "set a disk's QoS limits, enforced by every agent (0 or none "
              "lifts a limit; docs/qos.md), and its owner, group and mode "
              "(docs/permissions.md)")
    st.add_argument("name")
    perm_options(st)
    for kind in ("", "read-", "write-"):
        what = {"": "all I/O", "read-": "reads", "write-": "writes"}[kind]
        st.add_argument(f"--{kind}iops-limit", type=limit_arg(int), metavar="N",
                        help=f"at most N operations per second ({what})")
        st.add_argument(f"--{kind}bps-limit", type=limit_arg(size_arg), metavar="SIZE",
                        help=f"at most SIZE bytes per second ({what}; e.g. 100M)")

    verb(dv, "clone", "make a writable thin disk from a snapshot, sharing its storage"
         ).add_argument("snap", metavar="NAME@SNAP")
    dv.choices["clone"].add_argument("new", metavar="NEWNAME")

    ex = verb(dv, "export-diff", "write what changed in a snapshot since an older one "
              "(everything, without --from-snap) as a stream (docs/export-diff.md)")
    ex.add_argument("name", metavar="NAME@TO")
    ex.add_argument("file", metavar="FILE|-", help="where the stream goes (- for stdout)")
    ex.add_argument("--from-snap", metavar="FROM", help="the older snapshot (NAME@FROM or "
                    "FROM): only what changed since it")
    im = verb(dv, "import-diff", "apply a stream from export-diff to a disk, then snapshot "
              "it as the stream's TO (through a virtfs mount of the disk on this host)")
    im.add_argument("file", metavar="FILE|-", help="the stream (- for stdin)")
    im.add_argument("name", metavar="NAME", help="the disk to apply it to (the stream sets "
                    "its size)")
    im.add_argument("--mount", metavar="DIR", help="the virtfs mount to write through "
                    "(default: a mount on this host that the controller knows)")
    dry_run_option(im)

    sn = nouns.add_parser("snap", help="snapshots of disks (NAME@SNAP, read-only)")
    sv = sn.add_subparsers(dest="verb", metavar="VERB", required=True)
    verb(sv, "create", "snapshot a disk (in use or not): time independent of its size"
         ).add_argument("name", metavar="NAME@SNAP")
    verb(sv, "ls", "list a disk's snapshots, or every disk's (created, size, bytes only "
         "the snapshot holds)").add_argument("name", metavar="NAME", nargs="?")
    srm = verb(sv, "rm", "remove a snapshot: frees what nothing else maps")
    srm.add_argument("name", metavar="NAME@SNAP")
    dry_run_option(srm)
    rb = verb(sv, "rollback", "make a disk's content the snapshot's (refused while the disk "
              "is open anywhere, unless --force)")
    rb.add_argument("name", metavar="NAME@SNAP")
    rb.add_argument("--force", action="store_true", help="roll back under the agents that "
                    "have the disk open (they see the snapshot's content at once)")
    dry_run_option(rb)

    df = verb(sv, "diff", "list the byte ranges whose data differs between a snapshot and a "
              "later one (or the disk), from the tables: no data is read")
    df.add_argument("from_snap", metavar="NAME@FROM")
    df.add_argument("to", metavar="NAME@TO|NAME", nargs="?",
                    help="a later snapshot of the same disk, or the disk (default)")

    jb = nouns.add_parser("job", help="background data movement (migrate, drain)")
    jv = jb.add_subparsers(dest="verb", metavar="VERB", required=True)
    verb(jv, "ls", "list jobs: running ones with their progress, and recent ended ones")
    verb(jv, "abort", "stop a job; segments it is moving go back where they were"
         ).add_argument("id", type=int)

    gr = nouns.add_parser("group", help="a controller group on etcd (docs/ha.md)")
    grv = gr.add_subparsers(dest="verb", metavar="VERB", required=True)
    verb(grv, "step-down", "the leader hands over to a standby (for maintenance): it "
         "resigns, and clients go on to the new leader").add_argument(
        "--to", metavar="MEMBER", help="the standby to lead next (its member id, as "
        "vdctl status lists it; default: whichever standby wins)")
    ag = nouns.add_parser("agent", help="agents (virtfs-mount processes) the controller knows")
    agv = ag.add_subparsers(dest="verb", metavar="VERB", required=True)
    verb(agv, "ls", "list agents with their leases and open disks")
    return p


def rewrite_negative(argv: list[str]) -> list[str]:
    """argv with negative sizes ("-1G") hidden from argparse, which would take them for
    options; size_arg and delta_arg undo it."""
    return [_NEG + a[1:] if re.fullmatch(r"-\d[\d.]*[A-Za-z]*", a) else a for a in argv]


def _verb_parser(parser: argparse.ArgumentParser, words: list[str]
                 ) -> argparse.ArgumentParser:
    """The (sub)parser that words' NOUN VERB name (words: the non-option words, in
    order; others, such as option values, are passed over)."""
    p = parser
    for w in words:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if subs and w in subs[0].choices:
            p = subs[0].choices[w]
    return p


def misplaced_options(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """The one-line usage error for options given after "--" ("vdctl disk create -- -rf
    --size 1M"), else None; vdctl gives it when argv does not parse (so a disk may
    still be named "--thick": "vdctl disk create --size 1M -- --thick").

    After "--" every word is a name (getopt's rule, which argparse follows), so such
    a command fails with argparse's "--size is required" and a usage screen. The
    message shows the command with the options moved before the "--". An option is
    a word after "--" that the verb's parser knows (with its value, if it takes
    one); anything else stays a name.
    """
    if "--" not in argv:
        return None
    cut = argv.index("--")
    before, after = argv[:cut], argv[cut + 1:]
    vp = _verb_parser(parser, [w for w in before if not w.startswith("-")])
    opts = {s: a for a in vp._actions for s in a.option_strings}
    moved: list[str] = []
    names: list[str] = []
    i = 0
    while i < len(after):
        w = after[i]
        key = w.split("=", 1)[0]
        a = opts.get(key)
        if a is None or key in ("-h", "--help"):
            names.append(w)
            i += 1
            continue
        takes = a.nargs != 0 and "=" not in w
        moved += after[i:i + 1 + int(takes)]
        i += 1 + int(takes)
    if not moved:
        return None
    fixed = " ".join(shlex.quote(w) for w in [*before, *moved, "--", *names])
    return (f"options go before '--' (after it every word is a name): "
            f"vdctl {fixed}")
