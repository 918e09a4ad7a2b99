"""The controller's persistence: a checkpoint plus an append-only journal.

Files in the state dir:

- ``journal``: journal frames (magic ``VJ01``, payload length, CRC32 over the
  length bytes and the payload, msgpack record), each a complete transaction
  with a ``seq`` one above the previous. Records with ``seq`` at or below the
  checkpoint's are already in it and are skipped.
- ``journal.next``: exists only while a checkpoint is being written (or after a
  crash during one). When a checkpoint starts, new records go to this file;
  the checkpoint holds everything before them. Once the checkpoint is durable,
  ``journal.next`` is renamed over ``journal``. Replay reads ``journal`` and
  then ``journal.next``; recovery folds the second into the first.
- ``checkpoint``: the whole ``State`` as of record ``seq``, as a sequence of
  journal frames of about 512 KiB each (format 2): a header (format, seq,
  next_lun, boot, the jobs, the containers with their number of free ranges,
  the number of disks), the containers' free lists in slices, then per disk a frame with
  its fields and counts, its extents as five packed columns (vstart, length,
  lun, offset, flags, as ``ExtentMap.to_wire``) in slices, its alternates, and
  last an end frame with the counts, so a truncated file is detected. Written
  tmp -> fsync -> rename -> fsync(dir). The older format 1 (one frame holding
  ``State.to_wire()``, which stops working past the 64 MiB frame cap) is still
  read. Any damage is refused with ``JournalCorrupt`` naming the file.

On open, a torn tail (an incomplete or damaged last record, with no valid
record after it) is truncated away; damage followed by valid records means
the middle of the journal is lost, and the controller refuses to start,
naming the file and byte offset.

Group commit: a record is encoded, then applied to the in-memory state and
queued; one committer task writes every queued record with a single write +
fdatasync and then wakes all their waiters. Replies go out only after that.

Checkpoints do not stop the event loop or the commits: the committer switches
to ``journal.next`` and takes a copy-on-write snapshot of the state between two
batches (O(disks + extent chunks)); the snapshot is then encoded and written
by worker threads, 16 MiB per step, each step fdatasync'ed (so a journal
commit never queues behind much dirty checkpoint data), while records keep
being committed.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import IO, Any

import trio

from . import codec, faultpoints
from .fsutil import fsync_dir, write_all
from .state import STATE_FORMAT, Snapshot, State, StateError

log = logging.getLogger(__name__)

JOURNAL = "journal"
JOURNAL_NEXT = "journal.next"
CHECKPOINT = "checkpoint"
# Checkpoint once the journal grows past this. It bounds a restart's replay: about
# 450,000 records, 11-15 s at 100 TiB on a busy 2-core machine (64 MiB took 25-32 s;
# the aim for load + replay is 30 s); a background checkpoint at 100 TiB writes 825 MB.
CHECKPOINT_BYTES = 32 << 20
# Target size of one checkpoint frame. The worker thread holds the GIL while it
# packs one, so this bounds how long the event loop may wait for it: measured
# longest heartbeat gaps of 20-30 ms with 4 MiB frames, 6-10 ms with 512 KiB.
CHECKPOINT_PART_BYTES = 512 << 10
# written (and fdatasync'ed) per worker-thread call in the background: a cancellation
# point, and a bound on the dirty data a journal commit may have to wait behind
CHECKPOINT_STEP_BYTES = 16 << 20


class JournalCorrupt(Exception):
    """The persistent state is damaged in a way recovery must not paper over."""


@dataclass
class Recovery:
    state: State
    records: int = 0  # journal records replayed
    truncated_at: int | None = None  # torn tail cut here (in the last journal file)
    dropped_bytes: int = 0
    journal_bytes: int = 0  # size of the journal the controller appends to


def scan(data: bytes) -> tuple[list[Any], int]:
    """Decode complete frames from the start; (records, end of the last good one)."""
    records = []
    pos = 0
    parse = codec.parse_journal_frame
    while pos < len(data):
        r = parse(data, pos)
        if r is None:
            break
        records.append(r[0])
        pos = r[1]
    return records, pos


def find_valid_frame_after(data: bytes, pos: int) -> int | None:
    q = data.find(codec.JOURNAL_MAGIC, pos + 1)
    while q != -1:
        if codec.parse_journal_frame(data, q) is not None:
            return q
        q = data.find(codec.JOURNAL_MAGIC, q + 1)
    return None


# ---------------------------------------------------------------- checkpoint files


def part_bytes() -> int:
    """Target payload size of one checkpoint frame: CHECKPOINT_PART_BYTES, or less if
    the frame cap (codec.MAX_JOURNAL_RECORD) is lower, leaving room for overhead."""
    return max(1, min(CHECKPOINT_PART_BYTES, codec.MAX_JOURNAL_RECORD // 2))


def checkpoint_frames(snap: Snapshot) -> Iterator[bytes]:
    """The frames of a format-2 checkpoint of snap (lazy: encodes as it goes).

    Raises CodecError if a part exceeds the frame cap (a header with a great many
    containers, say)."""
    for part in snap.parts(part_bytes()):
        yield codec.journal_frame(part)


class CheckpointFile:
    """A checkpoint being written to ``checkpoint.tmp``; commit() makes it the checkpoint.

    Every method blocks (file I/O): call them from a worker thread on the loop.
    """

    def __init__(self, state_dir: str):
        self.path = os.path.join(state_dir, CHECKPOINT)
        self.tmp = self.path + ".tmp"
        self.bytes = 0
        self._fd: int | None = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def write_some(self, frames: Iterator[bytes], budget: int, *, sync: bool = False) -> bool:
        """Write frames until about budget bytes are written; True once frames is done.

        sync: fdatasync what was written, so that dirty checkpoint data never piles up
        (on ext4, a journal fdatasync meanwhile would wait for all of it to reach disk).
        """
        assert self._fd is not None
        start = self.bytes
        more = False
        for frame in frames:
            write_all(self._fd, frame)
            self.bytes += len(frame)
            if self.bytes - start >= budget:
                more = True
                break
        if sync:
            os.fdatasync(self._fd)
        return not more

    def commit(self) -> None:
        """fsync, rename over the checkpoint, fsync the directory."""
        assert self._fd is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        os.replace(self.tmp, self.path)
        fsync_dir(os.path.dirname(self.path) or ".")

    def abort(self) -> None:
        """Drop the partial file (idempotent; the old checkpoint stays)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass


def write_checkpoint(state_dir: str, state: State) -> int:
    """Write state as the checkpoint of state_dir, blocking until it is durable.

    Returns the file's size in bytes. For a live controller use the journal's
    background checkpoint instead: this encodes everything on the calling thread.
    """
    snap = state.snapshot()
    try:
        f = CheckpointFile(state_dir)
        try:
            f.write_some(checkpoint_frames(snap), 1 << 62)
            f.commit()
        finally:
            f.abort()
    finally:
        snap.release()
    return f.bytes


def _read_frames(f: IO[bytes], path: str) -> Iterator[Any]:
    """Decode the journal frames of an open checkpoint file one at a time.

    Raises JournalCorrupt (naming path and the byte offset) at a damaged or
    truncated frame."""
    hsize = codec.JOURNAL_HEADER.size
    pos = 0
    while True:
        head = f.read(hsize)
        if not head:
            return
        if len(head) < hsize:
            raise JournalCorrupt(f"{path}: checkpoint is truncated at byte offset {pos}")
        magic, length, crc = codec.JOURNAL_HEADER.unpack(head)
        if magic != codec.JOURNAL_MAGIC or length > codec.MAX_JOURNAL_RECORD:
            raise JournalCorrupt(f"{path}: checkpoint is damaged at byte offset {pos} "
                                 "(bad frame header)")
        payload = f.read(length)
        if len(payload) < length:
            raise JournalCorrupt(f"{path}: checkpoint is truncated at byte offset {pos}")
        if codec.journal_crc(length, payload) != crc:
            raise JournalCorrupt(f"{path}: checkpoint is damaged at byte offset {pos} "
                                 "(CRC mismatch)")
        try:
            obj = codec.unpack(payload, max_size=codec.MAX_JOURNAL_RECORD)
        except codec.CodecError as e:
            raise JournalCorrupt(f"{path}: checkpoint is damaged at byte offset {pos}: "
                                 f"{e}") from None
        yield obj
        pos += hsize + length


def load_checkpoint(state_dir: str) -> State:
    """The state in state_dir's checkpoint (an empty State if there is none).

    Reads format 2 (many frames) frame by frame, so the file is never in memory
    whole, and format 1 (one frame). Raises JournalCorrupt, naming the file, if it
    is damaged, truncated or does not describe a consistent state.
    """
    path = os.path.join(state_dir, CHECKPOINT)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return State()
    with f:
        frames = _read_frames(f, path)
        try:
            first = next(frames, None)
            if first is None:
                raise JournalCorrupt(f"{path}: checkpoint is empty")
            if isinstance(first, dict) and first.get("format") == STATE_FORMAT:
                if next(frames, None) is not None:
                    raise JournalCorrupt(f"{path}: data after a format-1 checkpoint")
                return State.from_wire(first)
            return State.from_parts(itertools.chain([first], frames))
        except StateError as e:
            raise JournalCorrupt(f"{path}: {e}") from None


# ---------------------------------------------------------------- recovery


def recover(state_dir: str, *, repair: bool = True) -> Recovery:
    """Load the checkpoint and replay ``journal`` then ``journal.next``.

    With repair, a torn tail is cut and a leftover ``journal.next`` (a crash
    during a checkpoint) is folded into ``journal``. Raises JournalCorrupt on
    damage that is not a torn tail, on missing records, on a record that does
    not apply, and on a damaged checkpoint.
    """
    state = load_checkpoint(state_dir)
    rec = Recovery(state)
    names = [n for n in (JOURNAL, JOURNAL_NEXT) if os.path.exists(os.path.join(state_dir, n))]
    # Decode and apply one record at a time: holding a million decoded records
    # at once costs hundreds of MiB and makes the cyclic GC rescan them over and
    # over (a quarter of the replay time at 1M records).
    expect = state.seq + 1
    parse = codec.parse_journal_frame
    good: dict[str, int] = {}
    applied: dict[str, int] = {}
    next_data = b""
    for k, name in enumerate(names):
        path = os.path.join(state_dir, name)
        with open(path, "rb") as f:
            data = f.read()
        end = 0
        applied[name] = 0
        while end < len(data):
            frame = parse(data, end)
            if frame is None:
                break
            r, nxt = frame
            seq = r.get("seq") if isinstance(r, dict) else None
            if not isinstance(seq, int):
                raise JournalCorrupt(f"{path}: record #{rec.records + 1} has no sequence number")
            if seq >= expect:  # lower seqs are already in the checkpoint
                if seq != expect:
                    raise JournalCorrupt(f"{path}: record #{rec.records + 1}: expected seq "
                                         f"{expect}, found {seq}: records are missing")
                try:
                    state.apply(r)
                except StateError as e:
                    raise JournalCorrupt(f"{path}: record #{rec.records + 1} (seq {seq}) does "
                                         f"not apply: {e}") from None
                expect += 1
                rec.records += 1
                applied[name] += 1
            end = nxt
        if end < len(data):
            later = find_valid_frame_after(data, end)
            if later is not None:
                raise JournalCorrupt(
                    f"{path}: damaged record at byte offset {end} with valid records after "
                    f"it (next at {later}); refusing to start. Restore the state dir from a "
                    f"backup or, to accept losing everything from offset {end} on, truncate "
                    "the file there")
            if k + 1 < len(names):
                raise JournalCorrupt(
                    f"{path}: damaged record at byte offset {end}, and {names[k + 1]} "
                    "follows it; refusing to start")
            rec.truncated_at = end
            rec.dropped_bytes = len(data) - end
            log.warning("%s: torn tail at offset %d (%d bytes) dropped", path, end,
                        len(data) - end)
            if repair:
                with open(path, "r+b") as f:
                    f.truncate(end)
                    os.fsync(f.fileno())
        good[name] = end
        if name == JOURNAL_NEXT:
            next_data = data[:end]
    rec.journal_bytes = sum(good.values())
    if repair and JOURNAL_NEXT in good:
        _fold_next(state_dir, next_data, replace=not applied.get(JOURNAL))
        rec.journal_bytes = os.path.getsize(os.path.join(state_dir, JOURNAL))
    return rec


def _fold_next(state_dir: str, next_data: bytes, *, replace: bool) -> None:
    """Make ``journal`` hold what ``journal`` + ``journal.next`` held; remove the latter.

    replace: nothing in ``journal`` is newer than the checkpoint, so ``journal.next``
    simply takes its place. Otherwise it is appended (a crash between the append
    and the unlink leaves its records twice; replay skips the second copies).
    """
    jpath = os.path.join(state_dir, JOURNAL)
    npath = os.path.join(state_dir, JOURNAL_NEXT)
    if replace:
        os.replace(npath, jpath)
    else:
        with open(jpath, "ab") as f:
            f.write(next_data)
            f.flush()
            os.fsync(f.fileno())
        os.unlink(npath)
    fsync_dir(state_dir)


# ---------------------------------------------------------------- the live journal


@dataclass
class _Batch:
    frames: list[bytes] = field(default_factory=list)
    last_seq: int = 0
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None
    fd: int = -1  # the journal file it is written to


@dataclass
class _CheckpointJob:
    snap: Snapshot
    old_fd: int  # the journal being retired: every record in it is in snap


class Journal:
    """Append records with group commit; checkpoint and truncate when it grows."""

    def __init__(self, state_dir: str, state: State, *, journal_bytes: int = 0,
                 checkpoint_bytes: int = CHECKPOINT_BYTES,
                 on_fatal: Callable[[BaseException], None] | None = None):
        self.state_dir = state_dir
        self.state = state
        self.path = os.path.join(state_dir, JOURNAL)
        self.next_path = os.path.join(state_dir, JOURNAL_NEXT)
        if os.path.exists(self.next_path):
            raise JournalCorrupt(f"{self.next_path}: left over from an interrupted checkpoint; "
                                 "recover() the state dir (with repair) first")
        self.checkpoint_bytes = checkpoint_bytes
        self.journal_bytes = journal_bytes
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._old_fd: int | None = None  # the journal a running checkpoint retires
        self._pending = _Batch()
        self._inflight: _Batch | None = None
        self._wakeup = trio.Event()
        self._closed = False
        self._checkpointing = False
        self._checkpoint_done: trio.Event | None = None
        self.durable_seq = state.seq
        self.commits = 0  # fsyncs done, for the benchmark and status
        self.checkpoints = 0
        self.last_checkpoint_bytes = 0
        self._on_fatal = on_fatal

    def record(self, rec: dict[str, Any]) -> int:
        """Encode rec (with its new seq), apply it to the state and queue it; its seq.

        Never blocks. Raises StateError, with nothing applied or queued, if the
        state refuses rec or if rec cannot be encoded (CodecError as its cause:
        an unpackable value or a record past the frame cap); either way the
        sequence has no gap.
        """
        if self._closed:
            raise RuntimeError("journal is closed")
        seq = self.state.seq + 1
        rec["seq"] = seq
        try:
            frame = codec.journal_frame(rec)
        except codec.CodecError as e:
            raise StateError(f"{rec.get('op')} record cannot be journaled: {e}") from e
        self.state.apply(rec)  # raises StateError with nothing changed
        self._pending.frames.append(frame)
        self._pending.last_seq = seq
        self._wakeup.set()
        return seq

    async def commit(self, rec: dict[str, Any]) -> int:
        """record() and wait until it is durable."""
        seq = self.record(rec)
        await self.wait_durable(seq)
        return seq

    async def wait_durable(self, seq: int) -> None:
        """Wait until record seq (and everything before it) is on disk."""
        while seq > self.durable_seq:
            inflight = self._inflight
            if inflight is not None and seq <= inflight.last_seq:
                batch = inflight  # being written right now
            else:
                batch = self._pending
            await batch.done.wait()
            if batch.error is not None:
                raise RuntimeError("journal write failed") from batch.error

    @staticmethod
    def _write(fd: int, frames: list[bytes]) -> int:
        data = b"".join(frames)
        write_all(fd, data)
        faultpoints.hit("journal.before_fsync")
        os.fdatasync(fd)
        faultpoints.hit("journal.after_fsync")
        return len(data)

    def checkpoint_now_sync(self) -> None:
        """Checkpoint with nothing in flight (used on clean shutdown and by tests).

        Blocks: it encodes and writes the whole state on the calling thread.
        """
        n = write_checkpoint(self.state_dir, self.state)
        if self._old_fd is not None:  # a background checkpoint was interrupted
            self._retire_old_sync()
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)
        self.journal_bytes = 0
        self.checkpoints += 1
        self.last_checkpoint_bytes = n

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The committer task (checkpoints run beside it, in its own nursery)."""
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    await self._wakeup.wait()
                    self._wakeup = trio.Event()
                    batch, self._pending = self._pending, _Batch()
                    if not batch.frames:
                        batch.done.set()
                        continue
                    batch.fd = self._fd
                    self._inflight = batch
                    try:
                        self.journal_bytes += await trio.to_thread.run_sync(
                            self._write, batch.fd, batch.frames)
                    except BaseException as e:
                        batch.error = e
                        batch.done.set()
                        if not isinstance(e, trio.Cancelled):
                            log.critical("journal write failed: %s; the controller must stop",
                                         e)
                        raise
                    self.durable_seq = batch.last_seq
                    self._inflight = None
                    self.commits += 1
                    batch.done.set()
                    if self.journal_bytes >= self.checkpoint_bytes and not self._checkpointing:
                        # between two batches: the snapshot and the switch of journal
                        # files happen with no write in flight
                        job = await self._start_checkpoint()
                        nursery.start_soon(self._finish_checkpoint, job)
        finally:
            self._closed = True

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
        fd = os.open(self.next_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        try:
            fsync_dir(self.state_dir)  # records acknowledged from it must survive a crash
        except BaseException:
            os.close(fd)
            raise
        return fd

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
        snap = self.state.snapshot()
        self._old_fd, self._fd = self._fd, new_fd
        self.journal_bytes = 0
        return _CheckpointJob(snap, self._old_fd)

    async def _finish_checkpoint(self, job: _CheckpointJob) -> None:
        try:
            t0 = trio.current_time()
            try:
                f = await trio.to_thread.run_sync(CheckpointFile, self.state_dir)
                try:
                    frames = checkpoint_frames(job.snap)
                    while not await trio.to_thread.run_sync(
                            partial(f.write_some, frames, CHECKPOINT_STEP_BYTES, sync=True)):
                        pass
                    await trio.to_thread.run_sync(f.commit)
                finally:
                    f.abort()  # no-op after commit; quick otherwise
            finally:
                job.snap.release()
            inflight = self._inflight
            if inflight is not None and inflight.fd == job.old_fd:
                await inflight.done.wait()  # (only when _checkpoint() raced a batch)
            await trio.to_thread.run_sync(self._retire_old_sync)
            self.checkpoints += 1
            self.last_checkpoint_bytes = f.bytes
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
        """The checkpoint is durable: ``journal.next`` becomes ``journal``."""
        os.replace(self.next_path, self.path)
        fsync_dir(self.state_dir)
        if self._old_fd is not None:
            os.close(self._old_fd)
            self._old_fd = None

    def close(self) -> None:
        self._closed = True
        os.close(self._fd)
        if self._old_fd is not None:
            os.close(self._old_fd)
            self._old_fd = None
