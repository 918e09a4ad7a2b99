"""vdctl's changed-block tracking and incremental backup: ``snap diff``,
``disk export-diff`` and ``disk import-diff`` (docs/export-diff.md).

The diff comes from the controller's tables (``snap.diff``, paged). An export
reads the snapshot's bytes through the controller (``snap.read``); an import
writes through a virtfs mount of the disk on this host, so allocation and
copy-on-write are the agent's as for any writer, and then takes the snapshot.
"""

from __future__ import annotations

import os
import socket
import stat
import sys
import tempfile
from typing import TYPE_CHECKING, Any

import trio

from . import diff as DF
from . import diffstream as S
from . import protocol as P
from .cli_format import shown
from .progress import size_bar
from .storage import punch_hole

if TYPE_CHECKING:
    from .cli import Cli


async def changes(cli: Cli, name: str, from_snap: str | None) -> tuple[int, list[DF.Change]]:
    """(name's size, the changes of name since from_snap (None: every range of name)),
    page by page from the controller, touching ones of one kind joined."""
    start: int | None = 0
    size = 0
    got: list[DF.Change] = []
    while start is not None:
        page = await cli.c.call("snap.diff", name=name, from_snap=from_snap, start=start)
        size = page["size"]
        got += [DF.Change(off, n, bool(data)) for off, n, data in page["changes"]]
        start = page["next"]
    return size, list(DF.join(got))


def check_from(name: str, from_snap: str) -> str:
    """FROM as DISK@SNAP: a bare SNAP takes the disk of name (NAME@TO or NAME)."""
    if P.SNAP_SEP in from_snap:
        return from_snap
    disk = name.partition(P.SNAP_SEP)[0]
    return P.snapshot_name(disk, from_snap)


async def snap_diff(cli: Cli) -> int:
    """vdctl snap diff NAME@FROM [NAME@TO|NAME]: the ranges whose data differs."""
    a = cli.args
    frm: str = a.from_snap
    if P.SNAP_SEP not in frm:
        raise P.invalid(f"{frm!r} is not NAME@SNAP: give the snapshot to diff from")
    to: str = a.to or frm.partition(P.SNAP_SEP)[0]
    frm = check_from(to, frm)
    _size, rows = await changes(cli, to, frm)
    if cli.json:
        cli.emit_json([c.to_dict() for c in rows])
    else:
        cli.table_out([[cli.sz(c.offset, True), cli.sz(c.length, True),
                        "data" if c.data else "zero"] for c in rows],
                      ["OFFSET", "LENGTH", "TYPE"], cli.out)
    data, zero = DF.changed_bytes(rows)
    print(f"{shown(frm)} -> {shown(to)}: {len(rows)} ranges, {cli.said(data)} data, "
          f"{cli.said(zero)} zero", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- export-diff

READS_IN_FLIGHT = 4  # snap.read calls an export keeps going at once
_ZEROS = bytes(S.MAX_DATA)


def _progress(total: int, desc: str) -> Any:
    return size_bar(total, desc)


async def _export(cli: Cli, w: S.StreamWriter, name: str, chs: list[DF.Change],
                  bar: Any) -> None:
    """Write chs of snapshot name to w: zero ranges as zero records, data ranges read
    (snap.read, READS_IN_FLIGHT at a time) as data records, all-zero pieces of them
    as zero records."""
    zero: list[int] = []  # a zero run not yet written: [offset, length]

    def put_zero(off: int, n: int) -> None:
        if zero and zero[0] + zero[1] == off:
            zero[1] += n
            return
        flush()
        zero[:] = [off, n]

    def flush() -> None:
        if zero:
            w.zero(zero[0], zero[1])
            zero.clear()

    pieces = [(c.offset + k, min(S.MAX_DATA, c.length - k)) if c.data else (c.offset, -c.length)
              for c in chs for k in (range(0, c.length, S.MAX_DATA) if c.data else (0,))]
    for i in range(0, len(pieces), READS_IN_FLIGHT):
        batch = pieces[i:i + READS_IN_FLIGHT]
        got: dict[int, bytes] = {}
        failed: dict[int, P.RemoteError] = {}

        async def read(off: int, n: int, got: dict[int, bytes] = got,
                       failed: dict[int, P.RemoteError] = failed) -> None:
            try:
                got[off] = (await cli.c.call("snap.read", name=name, offset=off,
                                             length=n))["data"]
            except P.RemoteError as e:  # kept, so that several failed reads say one line
                failed[off] = e

        async with trio.open_nursery() as nursery:
            for off, n in batch:
                if n > 0:
                    nursery.start_soon(read, off, n)
        if failed:
            raise failed[min(failed)]  # the first in the stream's order
        for off, n in batch:
            if n < 0:
                put_zero(off, -n)
                continue
            data = got[off]
            if len(data) != n:
                raise P.RemoteError(P.E_PROTOCOL, f"snap.read of {n} bytes answered "
                                    f"{len(data)}")
            if data == _ZEROS[:n]:
                put_zero(off, n)
            else:
                flush()
                w.data(off, data)
            bar.update(n)
    flush()


def _open_out(file: str) -> tuple[Any, str | None, str]:
    """(the file to write, the temp name it has until it is whole or None, the target
    name): a regular file (or a new one) is written as FILE.PID.part and renamed into
    place when whole; anything else (a FIFO, a device) is written directly."""
    target = os.path.abspath(file)
    regular = not os.path.exists(target) or stat.S_ISREG(os.stat(target).st_mode)
    tmp = f"{target}.{os.getpid()}.part" if regular else None
    return open(tmp or target, "wb"), tmp, target  # noqa: SIM115 - the caller closes it


async def disk_export_diff(cli: Cli) -> int:
    """vdctl disk export-diff NAME@TO [--from-snap FROM] FILE|-: the stream of what
    changed since FROM (everything without it) to FILE (atomically: a temp file renamed
    into place) or stdout."""
    a = cli.args
    to: str = a.name
    if P.SNAP_SEP not in to:
        raise P.invalid(f"{to!r} is not NAME@SNAP: export-diff exports a snapshot")
    frm = check_from(to, a.from_snap) if a.from_snap else None
    size, chs = await changes(cli, to, frm)
    header = S.Header(size, frm.partition(P.SNAP_SEP)[2] if frm else "",
                      to.partition(P.SNAP_SEP)[2])
    data, _zero = DF.changed_bytes(chs)
    if a.file == "-":
        out = getattr(cli.out, "buffer", None)
        if out is None:
            raise P.invalid("no binary stdout to write the stream to")
        tmp = target = None
    else:
        try:
            out, tmp, target = _open_out(a.file)
        except OSError as e:
            raise P.invalid(f"{a.file}: {e.strerror or e}") from None
    try:
        w = S.StreamWriter(out, header)
        bar = _progress(data, f"export {shown(to)}")
        try:
            await _export(cli, w, to, chs, bar)
        finally:
            bar.close()
        w.end()
        out.flush()
        if tmp is not None and target is not None:  # a regular file: durable, then named
            os.fsync(out.fileno())
            out.close()
            os.replace(tmp, target)
            tmp = None
    except BrokenPipeError:
        raise
    except OSError as e:
        raise P.RemoteError(P.E_IO, f"{a.file}: {e.strerror or e}; no stream written"
                            ) from None
    finally:
        if target is not None:
            out.close()
            if tmp is not None:
                os.unlink(tmp)
    since = f" since {shown(frm)}" if frm else " (full)"
    print(f"exported {shown(to)}{since}: {cli.said(w.data_bytes)} data, "
          f"{cli.said(w.zero_bytes)} zero in {w.records} records, {cli.said(w.bytes)} of "
          "stream",
          file=sys.stderr)
    return 0


# ---------------------------------------------------------------- import-diff


def _verified(file: str) -> tuple[Any, S.Header, S.StreamReader, int]:
    """(a binary file holding the whole stream, positioned at 0, its header, the
    reader that checked it (data_bytes, zero_bytes), its records): FILE itself, or
    stdin ("-") spooled to an unnamed temp file ($TMPDIR), read through once and
    checked. StreamError if it is damaged; OSError."""
    if file == "-":
        spool = tempfile.TemporaryFile()  # noqa: SIM115 - returned open
        try:
            r = S.tee_reader(sys.stdin.buffer, spool)
            h, n = r.verify()
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return spool, h, r, n
    f = open(file, "rb")  # noqa: SIM115 - returned open
    try:
        r = S.StreamReader(f)
        h, n = r.verify()
    except BaseException:
        f.close()
        raise
    f.seek(0)
    return f, h, r, n


def _import_plan(name: str, to: str, h: S.Header, checked: S.StreamReader, nrec: int,
                 old_size: int) -> dict[str, Any]:
    """What import-diff does to disk name, as it reports it (JSON) and its dry run
    answers it: "name", "snapshot" (NAME@TO, created), "from_snap" (NAME@FROM or
    None), "old_size" and "size" (bytes: the stream sets the disk's size),
    "records", "data" and "zero" (bytes the data and zero records cover)."""
    return {"name": name, "snapshot": to,
            "from_snap": P.snapshot_name(name, h.from_snap) if h.from_snap else None,
            "old_size": old_size, "size": h.size, "records": nrec,
            "data": checked.data_bytes, "zero": checked.zero_bytes}


def _apply(src: Any, path: str, bar: Any) -> int:
    """Apply the stream in src (checked already) to the file path in a virtfs mount:
    its size, data records written, zero records punched (the mount frees whole
    segments and zeroes the rest); fsync. Bytes applied. Blocking (a worker thread).
    StreamError if the stream changed since it was checked; OSError."""
    r = S.StreamReader(src)
    h = r.header()
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size != h.size:
            os.ftruncate(fd, h.size)
        done = 0
        for rec in r.records():
            if rec.data is None:
                punch_hole(fd, rec.offset, rec.length)
            else:
                view = memoryview(rec.data)
                pos = 0
                while pos < len(view):
                    pos += os.pwrite(fd, view[pos:], rec.offset + pos)
                bar.update(rec.length)
            done += rec.length
        os.fsync(fd)
        return done
    finally:
        os.close(fd)


def _disk_file(mount: str, name: str) -> str | None:
    """MOUNT/NAME made absolute if it is a regular file, else None."""
    path = os.path.join(os.path.abspath(mount), name)
    return path if os.path.isfile(path) else None


async def _mount_of(cli: Cli, name: str) -> str:
    """The path of disk name in a virtfs mount on this host: under --mount, else under
    the mount point of a connected agent on this host that shows it."""
    if cli.args.mount:
        path = _disk_file(cli.args.mount, name)
        if path is None:
            raise P.invalid(f"{os.path.join(cli.args.mount, name)!r} is not a disk file in a "
                            "virtfs mount")
        return path
    host = socket.gethostname()
    for a in await cli.c.call("agent.ls"):
        path = _disk_file(a["mount"], name) if a["connected"] and a["host"] == host else None
        if path is not None:
            return path
    raise P.invalid(f"import-diff writes through a virtfs mount of the disk, and no mount "
                    f"on this host ({host}) shows {name!r}: start virtfs-mount, or give "
                    "--mount DIR")


async def disk_import_diff(cli: Cli) -> int:
    """vdctl disk import-diff FILE|- NAME: check the whole stream, then check that it
    fits the disk (its FROM is the disk's newest snapshot, its TO is new), write it
    through a mount, and snapshot NAME@TO. Nothing is written unless the stream is
    whole and fits."""
    a = cli.args
    name: str = a.name
    what = "stdin" if a.file == "-" else a.file
    try:
        src, h, checked, nrec = await trio.to_thread.run_sync(_verified, a.file)
    except S.StreamError as e:
        raise P.invalid(f"{what}: refused, nothing applied: {e}") from None
    except OSError as e:
        raise P.invalid(f"{what}: {e.strerror or e}") from None
    try:
        old_size = (await cli.c.call("disk.info", name=name))["size"]
        snaps = await cli.c.call("snap.ls", name=name)
        newest = snaps[-1]["name"].partition(P.SNAP_SEP)[2] if snaps else None
        to = P.snapshot_name(name, h.to_snap)
        if h.from_snap and newest != h.from_snap:
            has = f"its newest snapshot is {newest!r}" if newest else "it has no snapshots"
            raise P.invalid(f"{what}: the stream applies on top of snapshot "
                            f"{h.from_snap!r}, but {shown(name)} does not fit: {has}")
        if any(s["name"] == to for s in snaps):
            raise P.RemoteError(P.E_EXISTS, f"{what}: snapshot {shown(to)} exists already")
        if h.from_snap:
            _size, since = await changes(cli, name, P.snapshot_name(name, h.from_snap))
            if since:
                print(f"vdctl: warning: {shown(name)} changed since "
                      f"{shown(P.snapshot_name(name, h.from_snap))}; where the stream does "
                      f"not write, it keeps those changes", file=sys.stderr)
        path = await _mount_of(cli, name)
        plan = _import_plan(name, to, h, checked, nrec, old_size)
        if a.dry_run:
            cut = (f", {cli.said(old_size - h.size)} past the new end discarded"
                   if h.size < old_size else "")
            return cli.dry({**plan, "dry_run": True},
                           f"{nrec} records would be applied to {shown(name)} through "
                           f"{path}: {cli.said(plan['data'])} of data written, "
                           f"{cli.said(plan['zero'])} zeroed; size {cli.said(old_size)} -> "
                           f"{cli.said(h.size)}{cut}; snapshot {shown(to)} created")
        total = os.fstat(src.fileno()).st_size
        bar = _progress(total, f"import {shown(name)}")
        try:
            done = await trio.to_thread.run_sync(_apply, src, path, _Counter(bar, total))
        except (OSError, S.StreamError) as e:
            back = (f"vdctl snap rollback {shown(P.snapshot_name(name, h.from_snap))} puts "
                    "it back" if h.from_snap else "import it again")
            raise P.RemoteError(P.E_IO, f"{what}: writing {path} failed after part of the "
                                f"stream: {e}; the disk is partly written ({back})") from None
        finally:
            bar.close()
    finally:
        src.close()
    await cli.c.call("snap.create", name=to)
    if cli.json:
        cli.emit_json(plan)
    print(f"imported {nrec} records ({cli.said(done)}) into {shown(name)}; "
          f"snapshot {shown(to)} created", file=sys.stderr)
    return 0


class _Counter:
    """A progress bar fed from a worker thread by bytes of data written."""

    def __init__(self, bar: Any, total: int):
        self.bar = bar
        self.total = total

    def update(self, n: int) -> None:
        self.bar.update(min(n, self.total - self.bar.n))
