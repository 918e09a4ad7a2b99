"""The controller's persistence: a checkpoint plus an append-only journal.

Files in the state dir:

- ``checkpoint``: one journal-framed msgpack map, the whole ``State`` as of
  record ``seq``. Written tmp -> fsync -> rename -> fsync(dir).
- ``journal``: journal frames (magic, length, CRC32, msgpack record), each a
  complete transaction with a ``seq`` one above the previous. Records with
  ``seq`` at or below the checkpoint's are already in it and are skipped.

On open, a torn tail (an incomplete or damaged last record, with no valid
record after it) is truncated away; damage followed by valid records means
the middle of the journal is lost, and the controller refuses to start,
naming the file and byte offset.

Group commit: records are applied to the in-memory state at once and queued;
one committer task writes every queued record with a single write + fdatasync
and then wakes all their waiters. Replies go out only after that.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from . import codec
from .state import State, StateError

log = logging.getLogger(__name__)

JOURNAL = "journal"
CHECKPOINT = "checkpoint"
CHECKPOINT_BYTES = 64 << 20  # checkpoint once the journal grows past this


class JournalCorrupt(Exception):
    """The persistent state is damaged in a way recovery must not paper over."""


@dataclass
class Recovery:
    state: State
    records: int = 0  # journal records replayed
    truncated_at: int | None = None  # torn tail cut here
    dropped_bytes: int = 0
    journal_bytes: int = 0


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


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


def load_checkpoint(state_dir: str) -> State:
    path = os.path.join(state_dir, CHECKPOINT)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return State()
    r = codec.parse_journal_frame(data, 0)
    if r is None or r[1] != len(data):
        raise JournalCorrupt(f"{path}: checkpoint is damaged (bad frame or CRC at offset 0)")
    try:
        return State.from_wire(r[0])
    except StateError as e:
        raise JournalCorrupt(f"{path}: {e}") from None


def recover(state_dir: str, *, repair: bool = True) -> Recovery:
    """Load the checkpoint, replay the journal, cut a torn tail (if repair)."""
    state = load_checkpoint(state_dir)
    rec = Recovery(state)
    path = os.path.join(state_dir, JOURNAL)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return rec
    # Decode and apply one record at a time: holding a million decoded records
    # at once costs hundreds of MiB and makes the cyclic GC rescan them over and
    # over (a quarter of the replay time at 1M records).
    expect = state.seq + 1
    parse = codec.parse_journal_frame
    end = 0
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
        end = nxt
    if end < len(data):
        later = find_valid_frame_after(data, end)
        if later is not None:
            raise JournalCorrupt(
                f"{path}: damaged record at byte offset {end} with valid records after it "
                f"(next at {later}); refusing to start. Restore the state dir from a backup "
                f"or, to accept losing everything from offset {end} on, truncate the file there"
            )
        rec.truncated_at = end
        rec.dropped_bytes = len(data) - end
        log.warning("%s: torn tail at offset %d (%d bytes) dropped", path, end,
                    len(data) - end)
        if repair:
            with open(path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
    rec.journal_bytes = end
    return rec


@dataclass
class _Batch:
    frames: list[bytes] = field(default_factory=list)
    last_seq: int = 0
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


class Journal:
    """Append records with group commit; checkpoint and truncate when it grows."""

    def __init__(self, state_dir: str, state: State, *, journal_bytes: int = 0,
                 checkpoint_bytes: int = CHECKPOINT_BYTES,
                 on_fatal: Callable[[BaseException], None] | None = None):
        self.state_dir = state_dir
        self.state = state
        self.path = os.path.join(state_dir, JOURNAL)
        self.checkpoint_bytes = checkpoint_bytes
        self.journal_bytes = journal_bytes
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._pending = _Batch()
        self._inflight: _Batch | None = None
        self._wakeup = trio.Event()
        self._closed = False
        self.durable_seq = state.seq
        self.commits = 0  # fsyncs done, for the benchmark and status
        self.checkpoints = 0
        self._on_fatal = on_fatal

    def record(self, rec: dict[str, Any]) -> int:
        """Apply rec to the state and queue it; returns its seq. Never blocks."""
        if self._closed:
            raise RuntimeError("journal is closed")
        seq = self.state.seq + 1
        rec["seq"] = seq
        self.state.apply(rec)  # raises StateError with nothing changed
        self._pending.frames.append(codec.journal_frame(rec))
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

    def _write(self, frames: list[bytes]) -> int:
        data = b"".join(frames)
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fdatasync(self._fd)
        return len(data)

    def _checkpoint_sync(self, snapshot: bytes) -> None:
        write_atomic(os.path.join(self.state_dir, CHECKPOINT), snapshot)
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)

    def checkpoint_now_sync(self) -> None:
        """Checkpoint with nothing in flight (used on clean shutdown and by tests)."""
        self._checkpoint_sync(codec.journal_frame(self.state.to_wire()))
        self.journal_bytes = 0
        self.checkpoints += 1

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The committer task."""
        task_status.started()
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                batch, self._pending = self._pending, _Batch()
                if not batch.frames:
                    batch.done.set()
                    continue
                self._inflight = batch
                try:
                    self.journal_bytes += await trio.to_thread.run_sync(self._write, batch.frames)
                except BaseException as e:
                    batch.error = e
                    batch.done.set()
                    log.critical("journal write failed: %s; the controller must stop", e)
                    raise
                self.durable_seq = batch.last_seq
                self._inflight = None
                self.commits += 1
                batch.done.set()
                if self.journal_bytes >= self.checkpoint_bytes:
                    await self._checkpoint()
        finally:
            self._closed = True

    async def _checkpoint(self) -> None:
        # The snapshot is taken between batches, on the event loop, so it is a
        # consistent state; records applied after it carry higher seqs.
        snapshot = codec.journal_frame(self.state.to_wire())
        # Records queued but not yet written are in the snapshot too; they still
        # reach the journal in the next batch and are skipped on replay.
        await trio.to_thread.run_sync(self._checkpoint_sync, snapshot)
        self.journal_bytes = 0
        self.checkpoints += 1
        log.info("checkpoint at seq %d (%d bytes)", self.state.seq, len(snapshot))

    def close(self) -> None:
        self._closed = True
        os.close(self._fd)
