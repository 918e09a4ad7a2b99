"""A hot standby: a group member's copy of the state, kept at the journal's head.

A standby of a controller group (issue 14, docs/ha.md "Hot standbys") watches the
journal's head key in etcd and, at each move, applies the records up to the new head
from the term files in the shared state dir, through the one ``State.apply`` (as
recovery does: controller/grouprecovery.py). When it is elected, its state is already
at (or one read from) the final head, so it serves without replaying the journal.

The standby reads each term file from where it stopped (a byte offset per file), so a
move costs what it adds. It never applies a frame past a head: a term's cut (where the
next term started) is that term's final head, so nothing it applied can be undone by
a failover. Anything unexpected (a file retired under it by a checkpoint, a gap, a
frame that does not apply) makes it start again from a full recovery; a file that
vanishes under a full recovery (at 100 TiB one takes tens of seconds, and the
leader's first checkpoint retires the files it reads) makes it read the head again
and start over. It never raises into its caller for that.

Blocking work (file reads, applies) runs in a worker thread; the state is handed
over only when it is not being worked on (``Standby.take``).
"""

from __future__ import annotations

import logging
import os

import trio

from . import frames
from .etcd import EtcdClient, EtcdError
from .frames import JournalCorrupt
from .grouprecovery import (
    START,
    GroupRecovery,
    Head,
    chain_cuts,
    head_key,
    listing,
    recover_files,
    term_file,
)
from .tables import StateError

log = logging.getLogger(__name__)


class Standby:
    """The state of a standby member, applied up to the journal's head.

    ``run()`` keeps it there (for the member's life as a standby); ``take(head)``
    (once elected) stops it and returns the state brought to that head. ``seq``: the
    last record applied (for the roster: a standby's lag is the head's seq less it).
    """

    def __init__(self, state_dir: str, client: EtcdClient, prefix: str) -> None:
        self.state_dir = state_dir
        self.client = client
        self.prefix = prefix
        self.rec: GroupRecovery | None = None  # None: not recovered yet (or given up)
        self._pos: dict[tuple[int, int], int] = {}  # (term, file k) -> next frame's offset
        self._cuts: dict[int, int] = {}  # the chain's cuts at the last head applied
        self._lock = trio.Lock()  # one catch-up at a time; take() waits for it
        self.full_recoveries = 0
        self.applied = 0  # records applied by catch-ups (not full recoveries)
        self.head: Head | None = None  # the newest head seen (the lag is its seq less seq)

    @property
    def seq(self) -> int:
        return self.rec.state.seq if self.rec is not None else 0

    async def run(self) -> None:
        """For ever: catch up with each move of the head key (a watch on it)."""
        key = head_key(self.prefix)
        while True:
            try:
                r = await self.client.get(key)
                if r.kv is not None:
                    await self.catch_up(Head.decode(r.kv.value))
                async with self.client.watch(key, start_revision=r.revision + 1) as w:
                    async for ev in w:
                        if ev.type == "PUT":
                            await self.catch_up(Head.decode(ev.kv.value))
            except (EtcdError, JournalCorrupt, OSError) as e:
                # OSError: a file vanished under a full recovery (the leader's checkpoint
                # retired it); the head read again names that checkpoint's files
                log.warning("hot standby: %s; again in 1 s", e)
                await trio.sleep(1)

    async def catch_up(self, head: Head) -> None:
        """Apply the records up to head (a full recovery first, or again after any
        surprise)."""
        if self.head is None or (head.term, head.seq) > (self.head.term, self.head.seq):
            self.head = head
        async with self._lock:
            if self.rec is not None and self.rec.state.seq >= head.seq and (
                    self.rec.head is not None and self.rec.head.term == head.term):
                return
            await trio.to_thread.run_sync(self._catch_up_sync, head)

    def _catch_up_sync(self, head: Head) -> None:
        if self.rec is not None:
            try:
                self._tail_sync(head)
                return
            except (OSError, JournalCorrupt, StateError) as e:
                log.info("hot standby: %s; recovering the state again", e)
        self.rec = recover_files(self.state_dir, head)
        self._pos = {}
        self._cuts = dict(self.rec.cuts)
        self.full_recoveries += 1

    def _tail_sync(self, head: Head) -> None:
        """Apply the records after the state's seq up to head, reading each file of the
        chain from where the last catch-up stopped. Raises JournalCorrupt when the
        files do not give exactly those records (the caller recovers in full)."""
        assert self.rec is not None
        state = self.rec.state
        terms, _ckpts = listing(self.state_dir)
        last = self.rec.head
        if last is not None and last.term == head.term and self._cuts:
            # the same term moved its head: the chain before it is as it was (no start
            # frames to read again); only this term's cut grows
            cuts = {**self._cuts, head.term: head.seq}
        else:
            cuts = chain_cuts(self.state_dir, head, terms)
        self._cuts = cuts
        for t in sorted(cuts):
            cut = cuts[t]
            if cut <= state.seq:
                continue
            for k in terms.get(t, []):
                if state.seq >= cut:
                    break
                self._read_file(t, k, cut)
        if state.seq != head.seq:
            raise JournalCorrupt(f"the term files end at seq {state.seq}, the head is at "
                                 f"{head.seq}")
        self.rec.head = head

    def _read_file(self, t: int, k: int, cut: int) -> None:
        assert self.rec is not None
        state = self.rec.state
        path = os.path.join(self.state_dir, term_file(t, k))
        start = self._pos.get((t, k), 0)
        with open(path, "rb") as f:
            f.seek(start)
            reader = frames.FrameReader(f)
            for r in reader:
                if start == 0 and isinstance(r, dict) and r.get("op") == START:
                    self._pos[(t, k)] = reader.end
                    continue
                if not isinstance(r, dict) or not isinstance(r.get("seq"), int):
                    raise JournalCorrupt(f"{path}: a frame without a sequence number")
                seq: int = r["seq"]
                if seq > cut:
                    return  # not counted (yet): read it again next time
                if seq > state.seq:
                    if seq != state.seq + 1:
                        raise JournalCorrupt(f"{path}: seq {seq} after {state.seq}")
                    state.apply_wire(r)
                    self.applied += 1
                self._pos[(t, k)] = start + reader.end

    async def take(self, head: Head) -> GroupRecovery:
        """Once elected: the state brought to head (the final one: no earlier term can
        move it any more), handed over; this Standby must not be used afterwards."""
        await self.catch_up(head)
        async with self._lock:
            rec, self.rec = self.rec, None
        if rec is None or rec.state.seq != head.seq:
            rec = await trio.to_thread.run_sync(recover_files, self.state_dir, head)
        return rec
