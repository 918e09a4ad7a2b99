"""vdctl's changed-block tracking and incremental backup: ``snap diff``,
``disk export-diff`` and ``disk import-diff`` (docs/export-diff.md).

The diff comes from the controller's tables (``snap.diff``, paged). An export
reads the snapshot's bytes through the controller (``snap.read``); an import
writes through a virtfs mount of the disk on this host, so allocation and
copy-on-write are the agent's as for any writer, and then takes the snapshot.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from . import diff as DF
from . import protocol as P
from .cli_format import shown
from .units import format_size

if TYPE_CHECKING:
    from .cli import Cli


async def changes(cli: Cli, name: str, from_snap: str | None) -> AsyncIterator[DF.Change]:
    """The changes of name since from_snap (None: every range of name), page by page
    from the controller, touching ones of one kind joined."""

    async def pages() -> AsyncIterator[DF.Change]:
        start: int | None = 0
        while start is not None:
            page = await cli.c.call("snap.diff", name=name, from_snap=from_snap, start=start)
            for off, n, data in page["changes"]:
                yield DF.Change(off, n, bool(data))
            start = page["next"]

    cur: DF.Change | None = None
    async for c in pages():
        if cur is not None and cur.end == c.offset and cur.data == c.data:
            cur = DF.Change(cur.offset, cur.length + c.length, c.data)
            continue
        if cur is not None:
            yield cur
        cur = c
    if cur is not None:
        yield cur


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
    rows: list[DF.Change] = [c async for c in changes(cli, to, frm)]
    if cli.json:
        cli.emit_json([c.to_dict() for c in rows])
    else:
        cli._table([[str(c.offset), str(c.length), "data" if c.data else "zero"] for c in rows],
                   ["OFFSET", "LENGTH", "TYPE"], cli.out)
    data, zero = DF.changed_bytes(rows)
    print(f"{shown(frm)} -> {shown(to)}: {len(rows)} ranges, {format_size(data)} data, "
          f"{format_size(zero)} zero", file=sys.stderr)
    return 0

