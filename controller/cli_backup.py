"""vdctl's changed-block tracking and incremental backup: ``snap diff``,
``disk export-diff`` and ``disk import-diff`` (docs/export-diff.md).

The diff comes from the controller's tables (``snap.diff``, paged). An export
reads the snapshot's bytes through the controller (``snap.read``); an import
writes through a virtfs mount of the disk on this host, so allocation and
copy-on-write are the agent's as for any writer, and then takes the snapshot.
"""

from __future__ import annotations

import os
import stat
import sys
from typing import TYPE_CHECKING, Any

import trio

from . import diff as DF
from . import diffstream as S
from . import protocol as P
from .cli_format import shown
from .units import format_size

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
        cli._table([[str(c.offset), str(c.length), "data" if c.data else "zero"] for c in rows],
                   ["OFFSET", "LENGTH", "TYPE"], cli.out)
    data, zero = DF.changed_bytes(rows)
    print(f"{shown(frm)} -> {shown(to)}: {len(rows)} ranges, {format_size(data)} data, "
          f"{format_size(zero)} zero", file=sys.stderr)
    return 0



# ---------------------------------------------------------------- export-diff

READS_IN_FLIGHT = 4  # snap.read calls an export keeps going at once
_ZEROS = bytes(S.MAX_DATA)


def _progress(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                file=sys.stderr, disable=None, leave=True)


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

        async def read(off: int, n: int, got: dict[int, bytes] = got) -> None:
            got[off] = (await cli.c.call("snap.read", name=name, offset=off, length=n))["data"]

        async with trio.open_nursery() as nursery:
            for off, n in batch:
                if n > 0:
                    nursery.start_soon(read, off, n)
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
        out, tmp, target = _open_out(a.file)
    try:
        w = S.StreamWriter(out, header)
        bar = _progress(data, f"export {shown(to)}")
        try:
            await _export(cli, w, to, chs, bar)
        finally:
            bar.close()
        w.end()
        out.flush()
        if tmp is not None:
            os.fsync(out.fileno())
    except BaseException:
        if tmp is not None:
            out.close()
            os.unlink(tmp)
        raise
    if tmp is not None:
        out.close()
        os.replace(tmp, target)  # type: ignore[arg-type]
    since = f" since {shown(frm)}" if frm else " (full)"
    print(f"exported {shown(to)}{since}: {format_size(w.data_bytes)} data, "
          f"{format_size(w.zero_bytes)} zero in {w.records} records, {w.bytes} bytes",
          file=sys.stderr)
    return 0
