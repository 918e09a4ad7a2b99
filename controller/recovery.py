"""Opening a state dir: the checkpoint, then the journal files replayed on top of it.

Files in the state dir:

- ``checkpoint``: the whole State as of one record (``checkpoint``).
- ``journal``: journal frames (``frames``), each a complete transaction with a
  ``seq`` one above the previous. Records with ``seq`` at or below the
  checkpoint's are already in it and are skipped.
- ``journal.next``: exists only while a checkpoint is being written (or after a
  crash during one). When a checkpoint starts, new records go to this file; the
  checkpoint holds everything before them. Once the checkpoint is durable,
  ``journal.next`` is renamed over ``journal``. Replay reads ``journal`` and then
  ``journal.next``; recovery folds the second into the first.

A torn tail (an incomplete or damaged last record, with no valid record after it)
is truncated away; damage followed by valid records means the middle of the
journal is lost, and recovery refuses, naming the file and byte offset.

Replay streams: records are read, decoded and applied one at a time, so memory is
bounded by the largest frame whatever the journal's size. Everything here blocks
(file I/O); the daemon runs it before its event loop serves anything.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import IO

from . import frames
from .checkpoint import CHECKPOINT, load_checkpoint
from .frames import JournalCorrupt
from .fsutil import fsync_dir
from .state import State
from .tables import StateError

__all__ = ["CHECKPOINT", "JOURNAL", "JOURNAL_NEXT", "Recovery", "recover"]

log = logging.getLogger(__name__)

JOURNAL = "journal"
JOURNAL_NEXT = "journal.next"


@dataclass
class Recovery:
    """What recover() found: the state, and what it did to the journal files."""

    state: State
    records: int = 0  # journal records replayed
    truncated_at: int | None = None  # torn tail cut here (bytes, in the last journal file)
    dropped_bytes: int = 0
    journal_bytes: int = 0  # size of the journal the controller appends to


def recover(state_dir: str, *, repair: bool = True) -> Recovery:
    """Load the checkpoint and replay ``journal`` then ``journal.next``.

    With repair, a torn tail is cut and a leftover ``journal.next`` (a crash
    during a checkpoint) is folded into ``journal``. Raises JournalCorrupt on
    damage that is not a torn tail, on missing records, on a record that does
    not apply, and on a damaged checkpoint; OSError as file I/O does.
    """
    state = load_checkpoint(state_dir)
    rec = Recovery(state)
    names = [n for n in (JOURNAL, JOURNAL_NEXT) if os.path.exists(os.path.join(state_dir, n))]
    # Decode and apply one record at a time: holding a million decoded records
    # at once costs hundreds of MiB and makes the cyclic GC rescan them over and
    # over (a quarter of the replay time at 1M records).
    expect = state.seq + 1
    good: dict[str, int] = {}
    applied: dict[str, int] = {}
    for k, name in enumerate(names):
        path = os.path.join(state_dir, name)
        applied[name] = 0
        with open(path, "rb") as f:
            reader = frames.FrameReader(f)
            for r in reader:
                if not isinstance(r, dict) or not isinstance(r.get("seq"), int):
                    raise JournalCorrupt(f"{path}: record #{rec.records + 1} has no sequence "
                                         "number")
                seq: int = r["seq"]
                if seq >= expect:  # lower seqs are already in the checkpoint
                    if seq != expect:
                        raise JournalCorrupt(f"{path}: record #{rec.records + 1}: expected seq "
                                             f"{expect}, found {seq}: records are missing")
                    try:
                        state.apply_wire(r)
                    except StateError as e:
                        raise JournalCorrupt(f"{path}: record #{rec.records + 1} (seq {seq}) "
                                             f"does not apply: {e}") from None
                    expect += 1
                    rec.records += 1
                    applied[name] += 1
            end = reader.end
            if reader.fault is not None:
                _torn_tail(rec, f, path, end, names[k + 1] if k + 1 < len(names) else None)
        if reader.fault is not None and repair:
            with open(path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        good[name] = end
    rec.journal_bytes = sum(good.values())
    if repair and JOURNAL_NEXT in good:
        _fold_next(state_dir, good[JOURNAL_NEXT], replace=not applied.get(JOURNAL))
        rec.journal_bytes = os.path.getsize(os.path.join(state_dir, JOURNAL))
    return rec


def _torn_tail(rec: Recovery, f: IO[bytes], path: str, end: int, after: str | None) -> None:
    """The journal file f (at path) holds no valid record from byte end on: note a torn
    tail in rec, or raise JournalCorrupt if a valid record follows the damage or a
    later journal file (named after) does."""
    size = os.fstat(f.fileno()).st_size
    later = frames.find_frame_after(f, end)
    if later is not None:
        raise JournalCorrupt(
            f"{path}: damaged record at byte offset {end} with valid records after "
            f"it (next at {later}); refusing to start. Restore the state dir from a "
            f"backup or, to accept losing everything from offset {end} on, truncate "
            "the file there")
    if after is not None:
        raise JournalCorrupt(
            f"{path}: damaged record at byte offset {end}, and {after} "
            "follows it; refusing to start")
    rec.truncated_at = end
    rec.dropped_bytes = size - end
    log.warning("%s: torn tail at offset %d (%d bytes) dropped", path, end, size - end)


def _fold_next(state_dir: str, next_bytes: int, *, replace: bool) -> None:
    """Make ``journal`` hold what ``journal`` + ``journal.next`` held; remove the latter.

    next_bytes: the valid length of ``journal.next``. replace: nothing in ``journal``
    is newer than the checkpoint, so ``journal.next`` simply takes its place.
    Otherwise its first next_bytes are appended, streamed (a crash between the
    append and the unlink leaves its records twice; replay skips the second copies).
    """
    jpath = os.path.join(state_dir, JOURNAL)
    npath = os.path.join(state_dir, JOURNAL_NEXT)
    if replace:
        os.replace(npath, jpath)
    else:
        with open(npath, "rb") as src, open(jpath, "ab") as dst:
            left = next_bytes
            while left:
                block = src.read(min(left, frames.READ_CHUNK))
                if not block:
                    break
                dst.write(block)
                left -= len(block)
            dst.flush()
            os.fsync(dst.fileno())
        os.unlink(npath)
    fsync_dir(state_dir)
