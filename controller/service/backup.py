"""Changed-block tracking and reading snapshots for backup (docs/export-diff.md).

``snap.diff`` answers the byte ranges whose data differs between a snapshot
FROM and a later snapshot TO of one disk (or the disk itself), from the
extent maps alone (controller/diff.py): read-only, nothing journaled, paged
by windows of the disk so that one answer holds the event loop for a bounded
walk. Without FROM it
answers every range of TO (data and zero): a full export.

``snap.read`` reads bytes of a snapshot from its containers (a worker
thread), for ``vdctl disk export-diff``. A snapshot's storage never changes
while it exists (a write to storage it shares is copied on write first), and
what could take it away (``snap rm``, the commit or abort of a move of its
segments) takes the snapshot's lock, which the read holds while it resolves
and reads the range.
"""

from __future__ import annotations

import os

import trio

from .. import diff as DF
from .. import protocol as P
from ..extents import ZERO
from ..state import Disk
from .context import Context

MAX_DIFF_CHANGES = 65536  # changes one snap.diff answer holds at most
DIFF_EXTENTS = 262144  # about how many extents of TO one snap.diff answer covers
MAX_READ = 4 << 20  # bytes one snap.read answers at most


def _read_pieces(pieces: list[tuple[str | None, int, int]]) -> bytes | bytearray:
    """The bytes of pieces (container path, offset, length; path None: zeros), in
    order, read into one buffer (no copies: a 4 MiB answer is copied enough on its way
    out). Blocking (a worker thread); OSError on a read error or a short read."""
    out = bytearray(sum(n for _p, _o, n in pieces))
    view = memoryview(out)
    fds: dict[str, int] = {}
    pos = 0
    try:
        for path, off, n in pieces:
            if path is not None:
                fd = fds.get(path)
                if fd is None:
                    fd = fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                got = 0
                while got < n:
                    k = os.preadv(fd, [view[pos + got:pos + n]], off + got)
                    if k <= 0:
                        raise OSError(f"short read of {path} at {off + got}: end of file")
                    got += k
            pos += n
    finally:
        view.release()
        for fd in fds.values():
            os.close(fd)
    return out


class Backup:
    """snap.diff and snap.read (see the module's docstring)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.state = ctx.state

    def _pair(self, name: str, from_snap: str | None) -> tuple[Disk | None, Disk]:
        """(FROM, TO): TO a snapshot "DISK@SNAP" or the disk; FROM a snapshot of the same
        disk, not newer than TO. RemoteError E_NOT_FOUND, E_INVALID."""
        to = self.ctx.snapshot(name) if P.is_snapshot_name(name) else self.ctx.disk(name)
        disk = to.parent if to.is_snapshot else to.name
        if from_snap is None:
            return None, to
        frm = self.ctx.snapshot(from_snap)
        if frm.parent != disk:
            raise P.invalid(f"{from_snap!r} is not a snapshot of disk {disk!r}")
        if to.is_snapshot and frm.ctime > to.ctime:
            raise P.invalid(f"{from_snap!r} is newer than {name!r}: give the older "
                            "snapshot first")
        return frm, to

    async def snap_diff(self, name: str, from_snap: str | None, start: int,
                        limit: int | None) -> dict[str, object]:
        """The ranges from start on whose data differs between from_snap ("DISK@FROM")
        and name ("DISK@TO" or "DISK"), each [offset, length, data] (data False: TO reads
        zeros there), at most limit (<= MAX_DIFF_CHANGES) of them, in a window of about
        DIFF_EXTENTS extents (diff.changes_cols); "next": where the next page starts, or
        None (a change may go on in the next page: join touching ones). Without
        from_snap: every range of TO, data and zero. RemoteError E_NOT_FOUND,
        E_INVALID."""
        frm, to = self._pair(name, from_snap)
        if start < 0:
            raise P.invalid("start must not be negative")
        cap = MAX_DIFF_CHANGES if limit is None else min(max(limit, 1), MAX_DIFF_CHANGES)
        # a window of about DIFF_EXTENTS of TO's extents (at their mean length), so one
        # answer holds the event loop for a bounded walk, however large the disk
        mean = -(-to.size // max(1, len(to.extents)))
        end = min(to.size, start + max(DIFF_EXTENTS * mean, P.BLOCK_SIZE))
        if frm is None:
            chs, nxt = DF.full(to.extents.stored_in(start, end), start, end, cap)
        else:
            chs, nxt = DF.changes_cols(frm.extents.columns(start, end),
                                       to.extents.columns(start, end), start, end, cap)
        if nxt is None and end < to.size:
            nxt = end
        return {"name": to.name, "from": frm.name if frm is not None else None,
                "size": to.size, "changes": [[c.offset, c.length, c.data] for c in chs],
                "next": nxt}

    async def snap_read(self, name: str, offset: int, length: int) -> dict[str, object]:
        """Bytes [offset, offset + length) of snapshot name (at most MAX_READ, within its
        size), read from its containers: {"data": bytes}. RemoteError E_NOT_FOUND,
        E_INVALID, E_IO (a failed container, a read error)."""
        s = self.ctx.snapshot(name)
        if offset < 0 or not 0 < length <= MAX_READ or offset + length > s.size:
            raise P.invalid(f"read {offset}+{length} is outside snapshot {name!r} (size "
                            f"{s.size}) or longer than {MAX_READ}")
        async with self.ctx.dlock(s):
            if self.state.snaps.get(name) is not s:
                raise P.not_found("snapshot", name)
            pieces: list[tuple[str | None, int, int]] = []
            for e in s.extents.entries(offset, offset + length):
                if e.flags & ZERO:
                    pieces.append((None, 0, e.length))
                    continue
                c = self.state.luns[e.lun]
                if c.failed:
                    raise P.RemoteError(P.E_IO, f"container {c.name!r} has failed: cannot "
                                        f"read {name!r} at {e.vstart}")
                pieces.append((c.path, e.offset, e.length))
            try:
                data = await trio.to_thread.run_sync(_read_pieces, pieces)
            except OSError as e:
                raise P.RemoteError(P.E_IO, f"reading {name!r} at {offset}: {e}") from None
        return {"data": data}


__all__ = ["MAX_DIFF_CHANGES", "MAX_READ", "Backup"]
