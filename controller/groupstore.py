"""The journal's store for a group of controllers on etcd (issue 14 items 2 and 6).

One leader term writes its own files, ``journal.TOKEN.K``, in the shared state dir
(their format and how they are read back: controller/grouprecovery.py). A batch of
records is durable, and may be acknowledged, only once

1. its frames are written and fdatasync'ed in the term's current file, and
2. ``Election.guarded_put`` (a txn comparing the leader key's create_revision with
   the term's token) has moved the head key ``PREFIX/journal/head`` to
   ``{"term": TOKEN, "seq": LAST}``.

The Journal pipelines the two: while one head move is in flight, the next batches
are written and fdatasync'ed, and the next move covers all of them (one txn for
several batches); a batch is acknowledged only once a move that covers it returns.
When etcd refuses a move, the term has ended: ``publish`` raises LeadershipLost, and
nothing after the last move that returned is acknowledged; the frames already in the
file lie past the term's cut and recovery ignores them.
docs/ha.md ("The journal in a group") has the argument.

``open_group_journal`` is how a leader gets its Journal: after its campaign has won,
recover the state from the head, then open the term's file 0 with its start frame.
"""

from __future__ import annotations

import logging
import os

import trio

from . import faultpoints, frames
from .adoption import adopt_local_sync, local_files
from .checkpoint import write_checkpoint
from .election import Election, Term
from .etcd import EtcdUnavailable
from .fsutil import fsync_dir, write_all
from .grouprecovery import (
    CHECKPOINT_FILE,
    START,
    TERM_FILE,
    GroupRecovery,
    Head,
    checkpoint_file,
    head_key,
    recover_group,
    term_file,
)
from .journal import Journal
from .journalstore import write_all_sync
from .state import State
from .statedir import lock_state_dir

log = logging.getLogger(__name__)

RETRY_S = 0.05  # between tries of a head move etcd did not answer


def group_prefix(election: Election) -> str:
    """The group's key prefix (the election's key is PREFIX/leader)."""
    return election.key.rsplit("/", 1)[0]


class GroupStore:
    """The files of one leader term plus the journal head in etcd.

    election, term: the campaign that won (term.token names the files); start: the
    head when the term began (None in a new group), as recovery read it after the
    campaign. Methods raise OSError as file I/O does; publish also raises
    LeadershipLost (the term ended) and EtcdError (etcd refused the txn otherwise).
    """

    def __init__(self, state_dir: str, election: Election, term: Term,
                 start: Head | None) -> None:
        self.state_dir = state_dir
        self.election = election
        self.term = term
        self.token = term.token
        self.start = start
        self.head_key = head_key(group_prefix(election))
        self.k = 0  # the term's current file
        self.head_moves = 0

    def _path(self, k: int) -> str:
        return os.path.join(self.state_dir, term_file(self.token, k))

    def _create(self, k: int, first: bytes = b"") -> int:
        fd = os.open(self._path(k), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            if first:
                write_all(fd, first)
                os.fdatasync(fd)
            fsync_dir(self.state_dir)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def open_sync(self) -> int:
        """Create the term's file 0 with its start frame (the head the term began at),
        durable before any head move of this term. FileExistsError if the term's
        files exist already (a term opens its journal once)."""
        prev = self.start
        first = frames.encode({"op": START, "term": self.token,
                               "prev_term": prev.term if prev else 0,
                               "prev_head": prev.seq if prev else 0})
        return self._create(0, first)

    def open_next_sync(self) -> int:
        """A checkpoint starts: the term's next file."""
        fd = self._create(self.k + 1)
        self.k += 1
        return fd

    publishes = True

    def write_sync(self, fd: int, batch_frames: list[bytes]) -> int:
        """Append the frames to the term's file fd and fdatasync them."""
        return write_all_sync(fd, batch_frames)

    async def publish(self, last_seq: int) -> None:
        """Move the head to (token, last_seq) with a txn fenced by the token (the
        Journal calls it only once every frame up to last_seq is fdatasync'ed). While
        etcd does not answer, retries (the txn is safe to repeat) until our own count of
        the lease says the term may be over: LeadershipLost, as when etcd refuses."""
        faultpoints.hit("journal.before_head")
        await self.move_head(last_seq)

    async def move_head(self, seq: int) -> None:
        """Move the head to (token, seq) with a txn fenced by the token; while etcd
        does not answer, retry (the txn is safe to repeat) until our own count of the
        lease says the term may be over. Raises LeadershipLost, EtcdError."""
        value = Head(self.token, seq).encode()
        warned = False
        while True:
            try:
                await self.election.guarded_put(self.head_key, value, self.token)
                break
            except EtcdUnavailable as e:
                self.term.check()  # LeadershipLost once the lease may be gone
                if not warned:
                    log.warning("journal head move to seq %d: %s; retrying", seq, e)
                    warned = True
                await trio.sleep(RETRY_S)
        self.head_moves += 1

    def checkpoint_name_for(self, seq: int) -> str:
        return checkpoint_file(self.token, seq)

    def write_checkpoint_sync(self, state: State) -> int:
        return write_checkpoint(self.state_dir, state, self.checkpoint_name_for(state.seq))

    def retire_sync(self, old_fd: int | None, checkpoint_seq: int, durable_seq: int) -> None:
        """Close old_fd; then, if the head has passed checkpoint_seq in this term (so
        the checkpoint counts: it holds only records that do), delete the files it
        makes useless: every earlier term's files, this term's files before the
        current one, and the checkpoints of this term or earlier ones below it."""
        if old_fd is not None:
            os.close(old_fd)
        if durable_seq < checkpoint_seq:
            log.info("checkpoint at seq %d: the head is at %d; nothing retired",
                     checkpoint_seq, durable_seq)
            return
        gone = 0
        for name in os.listdir(self.state_dir):
            if m := TERM_FILE.fullmatch(name):
                t, k = int(m[1]), int(m[2])
                drop = t < self.token or (t == self.token and k < self.k)
            elif m := CHECKPOINT_FILE.fullmatch(name):
                t, seq = int(m[1]), int(m[2])
                drop = t <= self.token and seq < checkpoint_seq
            else:
                continue
            if drop:
                try:
                    os.unlink(os.path.join(self.state_dir, name))
                    gone += 1
                except FileNotFoundError:
                    pass
        if gone:
            fsync_dir(self.state_dir)

    def reset_sync(self, fd: int, checkpoint_seq: int, durable_seq: int) -> None:
        """The current file stays (it may hold the term's start frame); the rest goes
        as after a background checkpoint."""
        self.retire_sync(None, checkpoint_seq, durable_seq)


async def open_group_journal(state_dir: str, election: Election, term: Term,
                             recovered: GroupRecovery | None = None,
                             **kw: int) -> tuple[Journal, GroupRecovery]:
    """The Journal of term (a campaign of election's that won), and what recovery
    found: the state is recovered from the head in etcd, read now (after the win, so
    no earlier term can move it any more), and the term's file 0 is created with its
    start frame. kw: Journal's checkpoint_bytes (and journal_bytes: by default the
    size of the term files replayed, so a long chain is checkpointed soon). Raises EtcdError,
    JournalCorrupt and OSError as recovery and the file's creation do. recovered: the
    state a hot standby brought to that head (controller/standby.py), used instead.

    The group's first term (no head yet) on a state dir with a standalone controller's
    journal adopts it (controller/adoption.py): under the state dir's flock (so
    StateDirBusy while a standalone controller runs on it), its state becomes this
    term's checkpoint, and the head moves to it before anything is served."""
    if recovered is None:
        rec = await recover_group(state_dir, election.client, group_prefix(election))
    else:  # a hot standby's state, already brought to the head read after the win
        rec = recovered
    if rec.head is None and local_files(state_dir):
        return await _adopt(state_dir, election, term, **kw)
    store = GroupStore(state_dir, election, term, rec.head)
    kw.setdefault("journal_bytes", rec.journal_bytes)
    journal = await trio.to_thread.run_sync(
        lambda: Journal(state_dir, rec.state, store=store, **kw))
    return journal, rec


async def _adopt(state_dir: str, election: Election, term: Term,
                 **kw: int) -> tuple[Journal, GroupRecovery]:
    """open_group_journal for a first term that adopts a standalone's journal."""
    lock_fd = await trio.to_thread.run_sync(lock_state_dir, state_dir)
    try:
        rec = await trio.to_thread.run_sync(adopt_local_sync, state_dir, term.token)
        store = GroupStore(state_dir, election, term, None)  # the chain starts here
        journal = await trio.to_thread.run_sync(
            lambda: Journal(state_dir, rec.state, store=store, **kw))
        try:
            await store.move_head(rec.state.seq)
        except BaseException:
            journal.close()
            raise
        rec.head = Head(term.token, rec.state.seq)
        rec.cuts = {term.token: rec.state.seq}
    finally:
        os.close(lock_fd)
    return journal, rec
