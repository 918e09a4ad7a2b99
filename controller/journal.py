"""The live journal: group commit of records, and checkpoints that retire it.

Where records become durable is the journal's store (``journalstore``): the local
files of a single controller (``LocalStore``: ``journal``, ``journal.next``, read back
by ``recovery``), or a group's term files plus the journal head in etcd
(``groupstore``, read back by ``grouprecovery``). Frames are in ``frames``, the
checkpoint's format in ``checkpoint``.

Group commit: a record is encoded, then applied to the in-memory state and
queued; one committer task writes every queued record at once (the store's
``write_sync``: a single write + fdatasync, in a worker thread). Locally that is the
durable point, and the committer then wakes all their waiters. In a group a record is
durable only once the store's ``publish`` has also moved the journal's head in etcd
past it; a second task, the publisher, does that, so the head move of one batch
overlaps the write + fdatasync of the next ones, and one move covers every batch
fdatasync'ed before it started. ``durable_seq`` only grows, in seq order, and only
past records whose frames are fdatasync'ed and (in a group) covered by a move that
returned; waiters are woken then. Replies go out only after that.

Checkpoints do not stop the event loop or the commits: the committer switches
to a new journal file (``journal.next``, locally) and takes a copy-on-write
snapshot of the state between two batches (O(disks + extent chunks)); the
snapshot is then encoded and written by worker threads, 16 MiB per step, each
step fdatasync'ed (so a journal commit never queues behind much dirty checkpoint
data), while records keep being committed. Once the checkpoint is durable, the
store retires the journal files it covers (locally: ``journal.next`` is renamed
over ``journal``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import trio

from . import codec, frames
from .checkpoint import CheckpointFile, Snapshot, checkpoint_frames
from .election import LeadershipLost
from .journalstore import JournalStore, LocalStore
from .records import Record
from .state import State
from .tables import StateError

log = logging.getLogger(__name__)

# Checkpoint once the journal grows past this. It bounds a restart's replay: about
# 450,000 records, 11-15 s at 100 TiB on a busy 2-core machine (64 MiB took 25-32 s;
# the aim for load + replay is 30 s); a background checkpoint at 100 TiB writes 825 MB.
CHECKPOINT_BYTES = 32 << 20
# written (and fdatasync'ed) per worker-thread call in the background: a cancellation
# point, and a bound on the dirty data a journal commit may have to wait behind
CHECKPOINT_STEP_BYTES = 16 << 20


@dataclass
class _Batch:
    frames: list[bytes] = field(default_factory=list)
    last_seq: int = 0
    fd: int = -1  # the journal file it is written to
    # blocking calls made (in the worker thread) before the frames are written: what
    # a record of the batch depends on (a write fault's copies, settled) is durable
    # before the record can be
    before: list[Callable[[], None]] = field(default_factory=list)


@dataclass
class _CheckpointJob:
    snap: Snapshot
    old_fd: int  # the journal being retired: every record in it is in snap


class Journal:
    """Append records with group commit; checkpoint and truncate when it grows.

    store: where records become durable (``journalstore``); by default the local
    files of state_dir (``LocalStore``, which raises JournalCorrupt if a
    ``journal.next`` is left over: recover() first). state must be what the
    store's files recover to (its seq the last durable record's).
    """

    def __init__(self, state_dir: str, state: State, *, journal_bytes: int = 0,
                 checkpoint_bytes: int = CHECKPOINT_BYTES, store: JournalStore | None = None):
        self.state_dir = state_dir
        self.state = state
        self.store: JournalStore = store if store is not None else LocalStore(state_dir)
        self.checkpoint_bytes = checkpoint_bytes
        self.journal_bytes = journal_bytes
        self._fd = self.store.open_sync()
        self._checkpoint_seq = 0  # the seq the running checkpoint covers
        self._old_fd: int | None = None  # the journal a running checkpoint retires
        self._pending = _Batch()
        self._wakeup = trio.Event()
        self._synced = trio.Event()  # set when synced_seq grows (wakes the publisher)
        self._advanced = trio.Event()  # set (and replaced) when durable_seq grows or on error
        self._error: BaseException | None = None  # what stopped the committer
        self._closed = False
        self._checkpointing = False
        self._checkpoint_done: trio.Event | None = None
        self.durable_seq = state.seq  # acknowledged: fdatasync'ed (and published)
        self.synced_seq = state.seq  # fdatasync'ed
        # the last record queued without a before call (strict) and with one (lazy: a
        # write fault's mark, answered before it is durable; docs/movement.md)
        self.strict_seq = state.seq
        self.lazy_seq = 0
        self.commits = 0  # fsyncs done, for the benchmark and status
        self.publishes = 0  # the store's publish calls (a group's head moves)
        self.checkpoints = 0
        # metrics hooks (controller/metrics.py): a group commit's records, bytes and
        # seconds; a background checkpoint's bytes and seconds
        self.on_commit: Callable[[int, int, float], None] = lambda n, b, t: None
        self.on_checkpoint: Callable[[int, float], None] = lambda b, t: None
        self.last_checkpoint_bytes = 0

    def record(self, rec: Record, before: Callable[[], None] | None = None) -> int:
        """Encode rec.to_wire() (with its new seq), apply rec to the state and queue
        it; its seq. before: a blocking call the committer makes in its worker thread
        ahead of writing the batch that holds rec (flushing what rec depends on, so rec
        is never durable without it); if it raises, the batch is not written and the
        committer stops as on a failed write (docs/movement.md, "Durable at fsync").

        Never blocks. Raises StateError, with nothing applied or queued, if the
        state refuses rec or if rec cannot be encoded (CodecError as its cause:
        an unpackable value or a record past the frame cap); either way the
        sequence has no gap.
        """
        if self._closed:
            raise RuntimeError("journal is closed")
        seq = self.state.seq + 1
        wire = rec.to_wire()
        wire["seq"] = seq
        try:
            frame = frames.encode(wire)
        except codec.CodecError as e:
            raise StateError(f"{rec.OP} record cannot be journaled: {e}") from e
        self.state.apply(rec, seq)  # raises StateError with nothing changed
        self._pending.frames.append(frame)
        self._pending.last_seq = seq
        if before is None:
            self.strict_seq = seq
        else:
            self._pending.before.append(before)
            self.lazy_seq = seq
        self._wakeup.set()
        return seq

    async def commit(self, rec: Record) -> int:
        """record() and wait until it is durable."""
        seq = self.record(rec)
        await self.wait_durable(seq)
        return seq

    async def wait_durable(self, seq: int) -> None:
        """Wait until record seq (and everything before it) is durable: fdatasync'ed
        and, in a group, covered by a head move. RuntimeError (caused by what stopped
        the committer) if it never will be."""
        while seq > self.durable_seq:
            if self._error is not None:
                raise RuntimeError("journal write failed") from self._error
            await self._advanced.wait()

    def _advance(self, seq: int) -> None:
        """Records up to seq are durable: wake their waiters."""
        self.durable_seq = seq
        self._advanced.set()
        self._advanced = trio.Event()

    def _fail(self, e: BaseException) -> None:
        """The committer stops: no record after durable_seq will ever be acknowledged."""
        if self._error is None:
            self._error = e
            if isinstance(e, LeadershipLost):  # a group's deposed leader
                log.warning("journal: %s; nothing more is committed here", e)
            elif not isinstance(e, trio.Cancelled):
                log.critical("journal write failed: %s; the controller must stop", e)
        self._closed = True  # nothing queued now will be durable
        self._advanced.set()

    def checkpoint_now_sync(self) -> None:
        """Checkpoint with nothing in flight (used on clean shutdown and by tests).

        Blocks: it encodes and writes the whole state on the calling thread.
        """
        n = self.store.write_checkpoint_sync(self.state)
        self._checkpoint_seq = self.state.seq
        if self._old_fd is not None:  # a background checkpoint was interrupted
            self._retire_old_sync()
        self.store.reset_sync(self._fd, self.state.seq, self.durable_seq)
        self.journal_bytes = 0
        self.checkpoints += 1
        self.last_checkpoint_bytes = n

    async def run(self, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The committer task (the publisher, for a store that publishes, and
        checkpoints run beside it, in its own nursery). Raises what stopped it (an
        OSError, LeadershipLost, ...), in an exception group."""
        try:
            async with trio.open_nursery() as nursery:
                if self.store.publishes:
                    nursery.start_soon(self._publisher)
                task_status.started()
                while True:
                    await self._wakeup.wait()
                    self._wakeup = trio.Event()
                    batch, self._pending = self._pending, _Batch()
                    if not batch.frames:
                        continue
                    batch.fd = self._fd
                    try:
                        t0 = time.perf_counter()
                        n = await trio.to_thread.run_sync(self._write_batch, batch)
                    except BaseException as e:
                        self._fail(e)
                        raise
                    self.journal_bytes += n
                    self.commits += 1
                    self.on_commit(len(batch.frames), n, time.perf_counter() - t0)
                    self.synced_seq = batch.last_seq
                    if self.store.publishes:
                        self._synced.set()  # the publisher acknowledges it
                    else:
                        self._advance(batch.last_seq)
                    if self.journal_bytes >= self.checkpoint_bytes and not self._checkpointing:
                        # between two batches: the snapshot and the switch of journal
                        # files happen with no write in flight
                        job = await self._start_checkpoint()
                        nursery.start_soon(self._finish_checkpoint, job)
        except BaseException as e:
            if self._error is None:  # stopped from outside (cancelled): no log
                self._error = e
            self._advanced.set()
            raise
        finally:
            self._closed = True

    def _write_batch(self, batch: _Batch) -> int:
        """In a worker thread: the batch's before calls, then its frames, fdatasync'ed."""
        for fn in batch.before:
            fn()
        return self.store.write_sync(batch.fd, batch.frames)

    async def _publisher(self) -> None:
        """A group's second stage: publish (move the head to) the last fdatasync'ed seq,
        one move at a time, each covering every batch fdatasync'ed before it started,
        and only then acknowledge them. A refused move (LeadershipLost) stops the
        committer: nothing after the last move that returned is acknowledged."""
        while True:
            await self._synced.wait()
            self._synced = trio.Event()
            target = self.synced_seq  # every frame up to it is fdatasync'ed
            if target <= self.durable_seq:
                continue
            try:
                await self.store.publish(target)
            except BaseException as e:
                self._fail(e)
                raise
            self.publishes += 1
            self._advance(target)

    async def _checkpoint(self) -> None:
        """Write a checkpoint of the state as it is now and retire the journal before it.

        Commits go on meanwhile (into ``journal.next``); the event loop is held only
        for the snapshot. Waits for a checkpoint already running to finish first.
        """
        while self._checkpointing:
            assert self._checkpoint_done is not None
            await self._checkpoint_done.wait()
        job = await self._start_checkpoint()
        await self._finish_checkpoint(job)

    def _open_next_sync(self) -> int:
        return self.store.open_next_sync()

    async def _start_checkpoint(self) -> _CheckpointJob:
        assert not self._checkpointing
        self._checkpointing = True
        self._checkpoint_done = trio.Event()
        try:
            new_fd = await trio.to_thread.run_sync(self._open_next_sync)
        except BaseException:
            self._end_checkpoint()
            raise
        # No checkpoint between these lines: the snapshot holds every record
        # written to the old journal (and the queued ones, which reach the new one
        # and are skipped on replay); every later record goes to the new journal.
        snap = Snapshot(self.state)
        self._checkpoint_seq = snap.seq
        self._old_fd, self._fd = self._fd, new_fd
        self.journal_bytes = 0
        return _CheckpointJob(snap, self._old_fd)

    async def _finish_checkpoint(self, job: _CheckpointJob) -> None:
        try:
            t0 = trio.current_time()
            try:
                f = await trio.to_thread.run_sync(
                    CheckpointFile, self.state_dir, self.store.checkpoint_name_for(job.snap.seq))
                try:
                    frames = checkpoint_frames(job.snap)
                    while not await trio.to_thread.run_sync(
                            partial(f.write_some, frames, CHECKPOINT_STEP_BYTES, sync=True)):
                        pass
                    # a queued record may depend on a batch's before call (a write
                    # fault's copies, settled): the checkpoint holding it takes effect
                    # only once that batch is written, so never ahead of the flush
                    await self.wait_durable(job.snap.seq)
                    await trio.to_thread.run_sync(f.commit)
                finally:
                    f.abort()  # no-op after commit; quick otherwise
            finally:
                job.snap.release()
            # the snapshot holds records queued but not yet durable: retire nothing
            # before they are (for a group: before the head has passed them in this
            # term). This also waits for a batch still being written to the old file
            # (when _checkpoint() raced one): its records are in the snapshot.
            await self.wait_durable(job.snap.seq)
            await trio.to_thread.run_sync(self._retire_old_sync)
            self.checkpoints += 1
            self.last_checkpoint_bytes = f.bytes
            self.on_checkpoint(f.bytes, trio.current_time() - t0)
            log.info("checkpoint at seq %d (%d bytes, %d extents, %.2f s)", job.snap.seq,
                     f.bytes, job.snap.extents, trio.current_time() - t0)
        except trio.Cancelled:
            raise
        except BaseException as e:
            log.critical("checkpoint failed: %s; the controller must stop", e)
            raise
        finally:
            self._end_checkpoint()

    def _end_checkpoint(self) -> None:
        self._checkpointing = False
        if self._checkpoint_done is not None:
            self._checkpoint_done.set()

    def _retire_old_sync(self) -> None:
        """The checkpoint is durable: the store drops the journal files it covers
        (locally, ``journal.next`` becomes ``journal``) and closes the old one."""
        old, self._old_fd = self._old_fd, None
        self.store.retire_sync(old, self._checkpoint_seq, self.durable_seq)

    def close(self) -> None:
        """Close the journal files; record() refuses from now on. Blocks (close(2))."""
        self._closed = True
        os.close(self._fd)
        if self._old_fd is not None:
            os.close(self._old_fd)
            self._old_fd = None
