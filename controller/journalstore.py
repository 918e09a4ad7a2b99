"""Where the journal's records become durable: one small interface, two stores.

``Journal`` (controller/journal.py) does the group commit and the checkpoints; what
a commit's durability *means*, and which files it writes, is its store's:

- ``LocalStore`` (a single controller, ``make run``, ``virtfs-controller --state-dir``):
  the files ``journal`` and ``journal.next`` of the state dir (controller/recovery.py);
  a batch is durable once it is written and fdatasync'ed.
- ``GroupStore`` (controller/groupstore.py, a group on etcd, issue 14): one journal
  file per leader term in the shared state dir; a batch is durable once it is
  fdatasync'ed *and* a txn fenced by the term's token has moved the journal's head
  key in etcd to its last seq (docs/ha.md, "The journal in a group").

A store's blocking methods (``*_sync``) run on a worker thread or before the loop.
"""

from __future__ import annotations

import os
from typing import Protocol

from . import faultpoints
from .checkpoint import CHECKPOINT, write_checkpoint
from .frames import JournalCorrupt
from .fsutil import fsync_dir, write_all
from .recovery import JOURNAL, JOURNAL_NEXT
from .state import State


class JournalStore(Protocol):
    """The persistence behind a Journal. fds are the store's own journal files."""

    def open_sync(self) -> int:
        """Open (creating it if need be) the file new records are appended to; its fd."""
        ...

    def open_next_sync(self) -> int:
        """A checkpoint starts: open the file records after its snapshot go to; its fd.
        It must be durable in the directory before a record in it is acknowledged."""
        ...

    #: whether a batch, once written, must also be published (``publish``) before it
    #: may be acknowledged: False locally, True for a group (the head in etcd)
    publishes: bool

    def write_sync(self, fd: int, batch_frames: list[bytes]) -> int:
        """Append a batch's frames to fd and fdatasync it (blocks: a worker thread runs
        it); the bytes written. Raises OSError (and whatever the fault points raise)."""
        ...

    async def publish(self, last_seq: int) -> None:
        """Whatever else this store needs before the records up to last_seq (all of
        them written by write_sync already) may be acknowledged. Called in seq order,
        never with a seq whose frames are not durable. Raises the store's own errors
        (for a group, LeadershipLost); the committer then stops."""
        ...

    def checkpoint_name_for(self, seq: int) -> str:
        """The file name of a checkpoint that covers the records up to seq."""
        ...

    def retire_sync(self, old_fd: int | None, checkpoint_seq: int, durable_seq: int) -> None:
        """A checkpoint of everything up to checkpoint_seq is durable: drop the journal
        files it makes useless (old_fd, if not None, is the one the checkpoint switched
        away from: closed here). durable_seq: the journal's acknowledged seq now."""
        ...

    def reset_sync(self, fd: int, checkpoint_seq: int, durable_seq: int) -> None:
        """After a checkpoint taken with nothing in flight (checkpoint_now_sync): the
        records in fd are all in it."""
        ...

    def write_checkpoint_sync(self, state: State) -> int:
        """Write state as a checkpoint (named by checkpoint_name_for(state.seq)),
        blocking until it is durable; its size in bytes."""
        ...


def write_all_sync(fd: int, batch_frames: list[bytes]) -> int:
    """One write of the frames to fd, then fdatasync; the bytes written. Blocks."""
    data = b"".join(batch_frames)
    write_all(fd, data)
    faultpoints.hit("journal.before_fsync")
    os.fdatasync(fd)
    faultpoints.hit("journal.after_fsync")
    return len(data)


class LocalStore:
    """Today's single controller: ``journal`` (``journal.next`` during a checkpoint)
    and ``checkpoint`` in state_dir; a commit is durable at fdatasync."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, JOURNAL)
        self.next_path = os.path.join(state_dir, JOURNAL_NEXT)
        if os.path.exists(self.next_path):
            raise JournalCorrupt(f"{self.next_path}: left over from an interrupted checkpoint; "
                                 "recover() the state dir (with repair) first")

    def open_sync(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def open_next_sync(self) -> int:
        fd = os.open(self.next_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        try:
            fsync_dir(self.state_dir)  # records acknowledged from it must survive a crash
        except BaseException:
            os.close(fd)
            raise
        return fd

    publishes = False

    def write_sync(self, fd: int, batch_frames: list[bytes]) -> int:
        return write_all_sync(fd, batch_frames)

    async def publish(self, last_seq: int) -> None:
        """Nothing: locally a batch is durable once fdatasync'ed."""

    def checkpoint_name_for(self, seq: int) -> str:
        return CHECKPOINT

    def retire_sync(self, old_fd: int | None, checkpoint_seq: int, durable_seq: int) -> None:
        """``journal.next`` becomes ``journal``."""
        os.replace(self.next_path, self.path)
        fsync_dir(self.state_dir)
        if old_fd is not None:
            os.close(old_fd)

    def reset_sync(self, fd: int, checkpoint_seq: int, durable_seq: int) -> None:
        os.ftruncate(fd, 0)
        os.fsync(fd)

    def write_checkpoint_sync(self, state: State) -> int:
        """Write state as the checkpoint, blocking; its size in bytes."""
        return write_checkpoint(self.state_dir, state)
