"""What agents are sent: rows, answers never ahead of the journal, restrict -> drain -> ack,
and the version stamp every answer and push carries."""

from __future__ import annotations

from array import array
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager

import trio

from .. import label
from .. import protocol as P
from ..agents import Agent
from ..bitmap import Bitmap
from ..extents import ERROR, INVALID, NOWRITE, ZERO, Extent
from ..moves import expand
from ..records import ControllerBoot
from ..state import Disk
from ..tables import Alt
from .context import Context

# A whole-table answer (disk.open, disk.table) of a disk with at least this many
# extents goes in the compact form (protocol.encode_rows). Smaller answers stay a
# list per row: the agent reads fault replies row by row (a fault covers its I/O
# plus at most two segments, far fewer entries than this), and small tables cost
# little either way.
COMPACT_MIN_EXTENTS = 4096
COMPACT_MIN_BYTES = 1 << 30  # pushes over this much of a disk go compact when they can
_WITH_NOWRITE = bytes(f | NOWRITE for f in range(256))  # a flags column, made nowrite
VERSION_BITS = 44  # version stamps per controller start: 1.7e13 (years at 100k/s)
FAULT_WAIT = 30.0  # longest a fault waits for a restriction on its range to lift


class Coherence:
    """What agents cache, kept coherent with the table.

    Owns the restricted ranges (entries invalid at every agent while a change is
    made), the frozen ranges (entries nowrite, write faults wait: a snapshot being
    taken), both per disk uid so a rename cannot orphan them; the event that wakes
    faults when one is lifted; and the version stamp.
    """

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.state = ctx.state
        self.journal = ctx.journal
        self.agents = ctx.agents
        self._restricted: dict[int, list[tuple[int, int]]] = {}
        self._frozen: dict[int, list[tuple[int, int]]] = {}
        # (disk uid, move vstart) -> (the move's Alt, its published blocks); an entry
        # whose Alt is not the move's current one (committed, aborted, cut, a new move
        # at the same place) counts for nothing
        self._published: dict[tuple[int, int], tuple[Alt, Bitmap]] = {}
        self._restriction_lifted = trio.Event()
        # stamps every table answer and push ("v"), so an agent can tell an answer that was
        # overtaken by a later change (it then faults again instead of using it). Never
        # from a clock (one stepped back would make every answer look stale): each start
        # journals a new boot number (see start()) and counts up from boot << VERSION_BITS.
        self.version = ctx.state.boot << VERSION_BITS
        # the seq of this start's "controller.boot" record: every record of the previous
        # start that survived it has a smaller seq (Faults.disk_sync)
        self.boot_seq = 0

    async def start(self) -> None:
        """Journal this start (a "controller.boot" record) before anything is answered.

        Version stamps then begin above every stamp the previous incarnation could have
        sent: it started from a smaller boot number and made fewer than 2**VERSION_BITS.
        """
        # the first start with labels chooses the installation's id (docs/labels.md)
        installation = None if self.state.installation is not None else label.new_id()
        self.boot_seq = await self.journal.commit(ControllerBoot(self.state.boot + 1,
                                                                 installation))
        self.version = self.state.boot << VERSION_BITS

    def bump(self) -> int:
        """A new version stamp (a change or a restriction is about to be sent)."""
        self.version += 1
        return self.version

    @staticmethod
    def row(e: Extent) -> list[int]:
        """An entry on the wire: [vstart, length, lun, offset, flags]."""
        return [e.vstart, e.length, e.lun, e.offset, e.flags]

    def entries(self, d: Disk, start: int, end: int,
                 writable: tuple[int, int] | None = None) -> Iterator[Extent]:
        """d's entries for [start, end) as agents see them, before restrictions: segments
        being moved split per block run (marked at L2, the rest nowrite at L1; moves.py),
        and entries on a failed container in state `error`."""
        entries: Iterator[Extent] = d.extents.entries(start, end)
        if d.alts:
            entries = expand(d, entries, writable,
                             lambda vs, a: self.published(d, vs, a))
        if d.is_snapshot:  # read-only: every entry
            entries = (e._replace(flags=e.flags | NOWRITE) for e in entries)
        elif len(self.state.family(d.family)) > 1:
            entries = self._shared_nowrite(d, entries)
        failed = {c.lun for c in self.state.containers.values() if c.failed}
        if failed:
            entries = (e._replace(flags=e.flags | ERROR) if e.lun in failed else e
                       for e in entries)
        return entries

    # ------------------------------------------------------------ published blocks
    def published(self, d: Disk, vstart: int, a: Alt) -> Bitmap | None:
        """The published blocks of d's move at vstart (alternate a), or None."""
        got = self._published.get((d.uid, vstart))
        if got is None or got[0] is not a:
            return None
        return got[1]

    def publish(self, d: Disk, vstart: int, a: Alt, runs: list[tuple[int, int]]) -> int:
        """Blocks runs ((first, count)) of d's move at vstart (alternate a) are writable at
        L2 in every answer and push from now on. Call only once they are marked
        (durably) and every agent that has d open acknowledged a push giving them at L2
        (drained): docs/movement.md, "published". Returns the bytes newly published."""
        got = self._published.get((d.uid, vstart))
        if got is None or got[0] is not a:
            got = (a, Bitmap(a.bitmap.nblocks))
            self._published[(d.uid, vstart)] = got
        bm = got[1]
        new = 0
        for b, n in runs:
            n = min(n, bm.nblocks - b)
            if n > 0:
                new += bm.set_range(b, n)
        return new * P.BLOCK_SIZE

    def unpublish(self, d: Disk, vstart: int) -> None:
        """Forget the published blocks of d's move at vstart (it ended)."""
        self._published.pop((d.uid, vstart), None)

    def _shared_nowrite(self, d: Disk, entries: Iterator[Extent]) -> Iterator[Extent]:
        """Entries whose storage a snapshot or clone shares turn nowrite (a write there
        faults and copies first: service/snapshots.py); split where sharing ends."""
        for e in entries:
            if e.flags & (ZERO | NOWRITE):
                yield e
                continue
            pos = e.vstart
            for lo, hi in self.state.referenced(d.family, e.vstart, e.vend, e.lun, e.offset,
                                                skip=d):
                if lo > pos:
                    yield e.clip(pos, lo)
                yield e.clip(lo, hi)._replace(flags=e.flags | NOWRITE)
                pos = hi
            if pos < e.vend:
                yield e.clip(pos, e.vend) if pos > e.vstart else e

    def _plain(self, d: Disk) -> bool:
        """No entry of d needs more than its stored form: no move, no failed container,
        nothing shared with a snapshot or clone, not frozen."""
        return (not d.alts and not any(c.failed for c in self.state.containers.values())
                and not d.is_snapshot and len(self.state.family(d.family)) == 1
                and d.uid not in self._frozen)

    def _shared_only(self, d: Disk) -> bool:
        """d's entries differ from its stored extents only by nowrite (sharing with a
        snapshot or clone, a snapshot's own, a whole-disk freeze): no move, no failed
        container (so _shared_columns gives them)."""
        return (not d.alts and not any(c.failed for c in self.state.containers.values())
                and all(lo <= 0 and d.size <= hi for lo, hi in self._frozen.get(d.uid, [])))

    def _shared_columns(self, d: Disk) -> list[bytes]:
        """d's whole table (stored extents; gaps left out) as the compact columns of
        protocol.encode_rows, for a disk that _shared_only allows, without a lookup per
        extent where nothing can differ: every entry of a snapshot or of a frozen disk
        is nowrite, and so is every extent of a chunk another table of the family maps
        as it is (ExtentMap.chunk_spans: copied at C speed, flags made nowrite); the
        other chunks go entry by entry (_shared_nowrite), as rows() gives them."""
        if d.is_snapshot or self._frozen.get(d.uid):
            cols = d.extents.columns(0, d.size)
            cols[4] = cols[4].translate(_WITH_NOWRITE)
            return cols
        others = [t.extents for t in self.state.family(d.family) if t is not d]
        out: list[array[int]] = [array("q"), array("q"), array("q"), array("q"),
                                 array("B")]
        for lo, hi, held in d.extents.chunk_spans(others):
            hi = min(hi, d.size)
            if lo >= hi:
                continue
            if held:
                cols = d.extents.columns(lo, hi)
                cols[4] = cols[4].translate(_WITH_NOWRITE)
                for a, b in zip(out, cols, strict=True):
                    a.frombytes(b)
                continue
            for e in self._shared_nowrite(d, iter(d.extents.stored_list(lo, hi))):
                for a, v in zip(out, (e.vstart, e.length, e.lun, e.offset, e.flags),
                                strict=True):
                    a.append(v)
        return [a.tobytes() for a in out]

    def rows(self, d: Disk, start: int, end: int,
             writable: tuple[int, int] | None = None) -> list[list[int]]:
        """Entries for [start, end) as the agent gets them: restricted ranges are invalid,
        frozen ones nowrite."""
        restricted = [(lo, hi) for lo, hi in self._restricted.get(d.uid, [])
                      if lo < end and start < hi]
        entries = self.entries(d, start, end, writable)
        frozen = [(lo, hi) for lo, hi in self._frozen.get(d.uid, []) if lo < end and start < hi]
        if frozen:
            entries = (e._replace(flags=e.flags | NOWRITE)
                       if any(lo < e.vend and e.vstart < hi for lo, hi in frozen) else e
                       for e in self._split_at(entries, frozen))
        if not restricted:
            return list(map(list, entries))
        rows = []
        for e in entries:
            flags = e.flags
            if any(lo < e.vend and e.vstart < hi for lo, hi in restricted):
                # split so only the restricted part turns invalid
                cuts = sorted({e.vstart, e.vend, *(x for r in restricted for x in r
                                                   if e.vstart < x < e.vend)})
                for lo, hi in zip(cuts, cuts[1:], strict=False):
                    inside = any(rlo <= lo and hi <= rhi for rlo, rhi in restricted)
                    off = e.offset + (lo - e.vstart) if not flags & ZERO else 0
                    rows.append([lo, hi - lo, e.lun, off, flags | (INVALID if inside else 0)])
                continue
            rows.append([e.vstart, e.length, e.lun, e.offset, flags])
        return rows

    def _table(self, d: Disk) -> dict[str, object]:
        return {
            "name": d.name, "size": d.size, "epoch": d.epoch, "segment_size": d.segment_size,
            "containers": {str(c.lun): c.path for c in self.state.containers.values()},
            "failed": [c.lun for c in self.state.containers.values() if c.failed],
            "qos": dict(d.qos),  # the disk's QoS limits (docs/qos.md)
            # containers shared between hosts: their I/O is O_DIRECT (docs/fencing.md)
            "shared": [c.lun for c in self.state.containers.values() if c.shared],
            # what each labelled container's label must say: agents check it before
            # their first I/O there (docs/labels.md)
            "labels": {str(c.lun): [self.state.installation, c.uuid]
                       for c in self.state.containers.values() if c.uuid is not None},
            "v": self.version,
        }

    async def answer(self, d: Disk, start: int, end: int,
                     writable: tuple[int, int] | None = None) -> dict[str, object]:
        """Entries for an agent, never more permissive than what is durable, but for
        lazy marks (a write fault's ``move.mark``, answered before it is durable: the
        blocks it marks are writable only for that fault's writer, who owes its seq
        to its next fsync; docs/movement.md, "Durable at fsync")."""
        # a mapping recorded by another request is visible in memory before its group
        # commit: wait until everything recorded so far is on disk, then answer
        await self.journal.wait_durable(self.journal.strict_seq)
        out = self._table(d)
        end = min(end, d.size)
        if (start == 0 and end == d.size and len(d.extents) >= COMPACT_MIN_EXTENTS
                and self._plain(d)):
            # a whole large table: packed columns, copied from the extent map's chunks
            # (milliseconds of the loop, not a row object per extent); the restricted
            # ranges go along for the agent to mark invalid
            invalid = [(max(lo, start), min(hi, end)) for lo, hi in
                       self._restricted.get(d.uid, []) if lo < end and start < hi]
            out["rows"] = P.encode_rows(d.extents.columns(start, end), invalid)
        elif (start == 0 and end == d.size and len(d.extents) >= COMPACT_MIN_EXTENTS
              and self._shared_only(d)):
            invalid = [(max(lo, start), min(hi, end)) for lo, hi in
                       self._restricted.get(d.uid, []) if lo < end and start < hi]
            out["rows"] = P.encode_rows(self._shared_columns(d), invalid)
        else:
            out["rows"] = self.rows(d, start, end, writable)
        return out

    @staticmethod
    def _split_at(entries: Iterator[Extent], ranges: list[tuple[int, int]]
                  ) -> Iterator[Extent]:
        """entries, cut at the bounds of ranges (so each piece is inside or outside)."""
        cuts = sorted({x for r in ranges for x in r})
        for e in entries:
            pos = e.vstart
            for x in cuts:
                if pos < x < e.vend:
                    yield e.clip(pos, x)
                    pos = x
            yield e.clip(pos, e.vend) if pos > e.vstart else e

    def is_restricted(self, d: Disk, start: int, end: int, write: bool = True) -> bool:
        """[start, end) is being changed (invalid), or frozen and this is a write."""
        def hit(ranges: list[tuple[int, int]]) -> bool:
            return any(lo < end and start < hi for lo, hi in ranges)
        return hit(self._restricted.get(d.uid, [])) or (
            write and hit(self._frozen.get(d.uid, [])))

    async def wait_unrestricted(self, d: Disk, name: str, start: int, end: int,
                                write: bool = True) -> None:
        """Wait (up to FAULT_WAIT) until is_restricted(d, start, end, write) is no more;
        RemoteError E_BUSY if it still is then (name: d's name in the request)."""
        with trio.move_on_after(FAULT_WAIT):
            while self.is_restricted(d, start, end, write):
                await self._restriction_lifted.wait()
        if self.is_restricted(d, start, end, write):
            raise P.RemoteError(P.E_BUSY, f"{name!r} at {start} is being changed; retry")

    @asynccontextmanager
    async def freeze(self, d: Disk) -> AsyncIterator[None]:
        """Make every entry of d nowrite at every agent, drained and acknowledged, and
        hold write faults, for the block; reads never stop (a snapshot being taken).

        One "freeze" push (push_freeze), applied by each agent in O(1), not the disk's
        rows: a 1 TiB disk freezes in the time of one round trip. Nothing is pushed at
        the end: what the agents hold stays nowrite (after a snapshot every entry is
        shared), and a write there faults and gets the rows as they are then."""
        async with self._held(self._frozen, d, (0, P.MAX_DISK_SIZE),
                              lambda: self.push_freeze(d)):
            yield

    @asynccontextmanager
    async def restrict(self, d: Disk, start: int, end: int,
                       exclude: Agent | None) -> AsyncIterator[None]:
        """Turn off I/O on [start, end) at every caching agent, drained, for the block."""
        async with self._held(self._restricted, d, (start, end),
                              lambda: self.push_update(d, start, end, exclude=exclude,
                                                       drain=True)):
            yield

    @asynccontextmanager
    async def _held(self, ranges: dict[int, list[tuple[int, int]]], d: Disk,
                    rng: tuple[int, int], push: Callable[[], Awaitable[None]]
                    ) -> AsyncIterator[None]:
        """Hold rng in ranges (_restricted: entries invalid; _frozen: nowrite, writes
        wait) for the block, with push() (what makes the agents' entries so, drained and
        acknowledged) awaited first; faults waiting on it are woken at the end."""
        await self.agents.wait_grace()
        ranges.setdefault(d.uid, []).append(rng)
        try:
            await push()
            yield
        finally:
            lst = ranges.get(d.uid, [])
            if rng in lst:
                lst.remove(rng)
            if not lst:
                ranges.pop(d.uid, None)
            self.bump()
            self._restriction_lifted.set()
            self._restriction_lifted = trio.Event()

    async def push_freeze(self, d: Disk) -> None:
        """Send {"push": "freeze", "disk", "epoch", "v", "drain": true} to every agent
        caching d and wait for each to acknowledge: it has made every entry of d it
        holds nowrite (in O(1): virtfs/mapcache.py DiskTable.fence) and waited for the
        I/O it had begun. Its stamp v is new (bump), so an answer built before the
        freeze (older v) is not applied there afterwards; answers built after it carry
        the frozen ranges' nowrite (rows)."""
        self.bump()
        agents = self.agents.caching(d)
        if agents:
            await self.agents.push_all(agents, {
                "push": "freeze", "disk": d.name, "epoch": d.epoch, "v": self.version,
                "drain": True})

    async def push_update(self, d: Disk, start: int, end: int,
                          exclude: Agent | None = None, drain: bool = False) -> None:
        """Send d's entries for [start, end) to every agent caching d (but exclude) and
        wait for each to apply them and acknowledge; with drain, each first waits for
        its I/O in flight in the range (so none goes on under the entries replaced)."""
        self.bump()
        agents = self.agents.caching(d, exclude)
        if agents:
            end = max(start, min(end, d.size))
            await self.agents.push_all(agents, {
                "push": "update", "disk": d.name, "epoch": d.epoch, "size": d.size,
                "start": start, "end": end, "rows": self._push_rows(d, start, end),
                "drain": drain, "v": self.version})

    def _push_rows(self, d: Disk, start: int, end: int) -> list[list[int]] | dict[str, object]:
        """rows for a push; a large range of a disk whose entries are its stored extents
        (frozen or not: a freeze only adds nowrite) goes in the compact form, copied from
        the extent map at C speed, so a whole-disk push stalls the loop for milliseconds."""
        if (end - start < COMPACT_MIN_BYTES or d.alts or d.is_snapshot
                or any(c.failed for c in self.state.containers.values())
                or self._restricted.get(d.uid)):
            return self.rows(d, start, end)
        frozen = any(lo <= start and end <= hi for lo, hi in self._frozen.get(d.uid, []))
        if not frozen and (len(self.state.family(d.family)) > 1 or self._frozen.get(d.uid)):
            return self.rows(d, start, end)
        cols = d.extents.columns(start, end)
        if frozen:
            cols[4] = cols[4].translate(_WITH_NOWRITE)
        return P.encode_rows(cols, [])
