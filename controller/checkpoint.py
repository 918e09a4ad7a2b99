"""The checkpoint file: the whole State as of one record, in a state dir.

``checkpoint`` is a sequence of frames (``frames``) of about 512 KiB each (format 2):
a header (format, seq, next_lun, boot, the jobs, the containers with their number of
free ranges, the number of disks), the containers' free lists in slices, then per
disk a frame with its fields and counts, its extents as five packed columns (vstart,
length, lun, offset, flags, as ``ExtentMap.to_wire``) in slices, its alternates, and
last an end frame with the counts, so a truncated file is detected. Written
tmp -> fsync -> rename -> fsync(dir). The older format 1 (one frame holding the whole
state as one map, which stops working past the 64 MiB frame cap) is still read. Any
damage is refused with ``JournalCorrupt`` naming the file.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import IO, Any

from . import frames
from .frames import JournalCorrupt
from .fsutil import fsync_dir, write_all
from .state import STATE_FORMAT, Snapshot, State, StateError

CHECKPOINT = "checkpoint"
# Target size of one checkpoint frame. The worker thread holds the GIL while it
# packs one, so this bounds how long the event loop may wait for it: measured
# longest heartbeat gaps of 20-30 ms with 4 MiB frames, 6-10 ms with 512 KiB.
CHECKPOINT_PART_BYTES = 512 << 10


def part_bytes() -> int:
    """Target payload size of one checkpoint frame: CHECKPOINT_PART_BYTES, or less if
    the frame cap (frames.MAX_JOURNAL_RECORD) is lower, leaving room for overhead."""
    return max(1, min(CHECKPOINT_PART_BYTES, frames.MAX_JOURNAL_RECORD // 2))


def checkpoint_frames(snap: Snapshot) -> Iterator[bytes]:
    """The frames of a format-2 checkpoint of snap (lazy: encodes as it goes).

    Raises CodecError if a part exceeds the frame cap (a header with a great many
    containers, say)."""
    for part in snap.parts(part_bytes()):
        yield frames.encode(part)


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
    """Decode the frames of an open checkpoint file one at a time (streaming).

    Raises JournalCorrupt (naming path and the byte offset) at a damaged or
    truncated frame."""
    reader = frames.FrameReader(f)
    yield from reader
    fault = reader.fault
    if fault is None:
        return
    at = f"{path}: checkpoint is {{}} at byte offset {fault.offset}"
    if fault.kind == frames.TRUNCATED:
        raise JournalCorrupt(at.format("truncated"))
    if fault.kind == frames.BAD_PAYLOAD:
        raise JournalCorrupt(at.format("damaged") + f": {fault.detail}")
    raise JournalCorrupt(at.format("damaged") + f" ({fault.kind})")


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
        parts = _read_frames(f, path)
        try:
            first = next(parts, None)
            if first is None:
                raise JournalCorrupt(f"{path}: checkpoint is empty")
            if isinstance(first, dict) and first.get("format") == STATE_FORMAT:
                if next(parts, None) is not None:
                    raise JournalCorrupt(f"{path}: data after a format-1 checkpoint")
                return State.from_wire(first)
            return State.from_parts(itertools.chain([first], parts))
        except StateError as e:
            raise JournalCorrupt(f"{path}: {e}") from None
