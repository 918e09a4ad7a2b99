"""A state dir's two kinds, and the one way from a standalone controller's to a group's.

A standalone controller (``virtfs-controller --state-dir DIR``, an embedded one of
``virtfs-mount``) keeps ``journal``, ``journal.next`` and ``checkpoint`` in DIR
(controller/recovery.py); a group's leaders keep ``journal.TOKEN.K`` and
``checkpoint.TOKEN.SEQ`` there, counted up to the head in etcd
(controller/grouprecovery.py). The names do not clash, so each kind must look for the
other's files itself, or it would start from an empty state on a DIR full of disks:

- A group's **first** leader (no head in etcd yet) on a DIR with a standalone's files
  adopts them (``adopt_local_sync``, under the standalone's flock on ``DIR/lock``, so
  a standalone controller still running on DIR is refused): it recovers the local
  journal on its checkpoint, as a standalone restart would (a torn tail is cut, a
  ``journal.next`` folded in), and gives the state to its own term as the checkpoint
  ``checkpoint.TOKEN.SEQ`` (a hard link to ``checkpoint`` when no record lies past
  it, else a new one). The caller then starts the term's file with its start frame
  and moves the head to (TOKEN, SEQ), fenced by the token: from then on the chain
  begins at that checkpoint and every later term follows from it. The standalone's
  files are left as they were, and no longer read.
- A **standalone** controller on a DIR that holds a group's files refuses to start
  (``refuse_group_dir``): the group's state is past anything its own files say.

docs/ha.md, "Running a group", "From a standalone controller to a group".
"""

from __future__ import annotations

import logging
import os

from .checkpoint import CHECKPOINT, write_checkpoint
from .fsutil import fsync_dir
from .grouprecovery import CHECKPOINT_FILE, TERM_FILE, GroupRecovery, checkpoint_file
from .recovery import JOURNAL, JOURNAL_NEXT, recover
from .statedir import StateDirBusy

log = logging.getLogger(__name__)

LOCAL_FILES = (JOURNAL, JOURNAL_NEXT, CHECKPOINT)


def local_files(state_dir: str) -> list[str]:
    """The standalone controller's journal files present in state_dir."""
    return [n for n in LOCAL_FILES if os.path.exists(os.path.join(state_dir, n))]


def group_files(state_dir: str) -> list[str]:
    """A group's journal and checkpoint files present in state_dir, sorted."""
    try:
        names = os.listdir(state_dir)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if TERM_FILE.fullmatch(n) or CHECKPOINT_FILE.fullmatch(n))


def refuse_group_dir(state_dir: str) -> None:
    """For a standalone controller, under its lock: StateDirBusy (one line) if
    state_dir holds a group's files."""
    found = group_files(state_dir)
    if found:
        raise StateDirBusy(
            f"state dir {state_dir} holds a controller group's journal ({found[0]}"
            f"{', ...' if len(found) > 1 else ''}): run every controller on it with "
            "--etcd (docs/ha.md); a controller without --etcd would not see the "
            "group's state")


def adopt_local_sync(state_dir: str, token: int) -> GroupRecovery:
    """The state of a standalone's files in state_dir, made term token's checkpoint
    ``checkpoint.TOKEN.SEQ`` (durable when this returns). The caller holds the flock
    on state_dir/lock (statedir.lock_state_dir), is the leader of term token, and read
    no head in etcd after its campaign won. Blocks; raises JournalCorrupt as recover()
    does (nothing is adopted then), OSError.

    The returned GroupRecovery has head None: the term's start frame must say
    (0, 0) (the chain starts at the checkpoint), and the caller moves the head to
    (token, state.seq) once the term's file 0 exists."""
    local = recover(state_dir)  # repair (it logs a torn tail): as a standalone's restart
    state = local.state
    name = checkpoint_file(token, state.seq)
    src = os.path.join(state_dir, CHECKPOINT)
    dst = os.path.join(state_dir, name)
    if local.records == 0 and os.path.exists(src):
        # the checkpoint holds the whole state (a clean stop leaves it so): share it,
        # no copy of a file that may be hundreds of MB (it is never written in place)
        try:
            os.unlink(dst)  # a leftover of an adoption that died before its head move
        except FileNotFoundError:
            pass
        os.link(src, dst)
        fsync_dir(state_dir)
    else:
        write_checkpoint(state_dir, state, name)
    log.warning("state dir %s: adopted a standalone controller's journal at seq %d "
                "(%d records replayed on its checkpoint) as %s; its files (%s) stay as "
                "they were, no longer read", state_dir, state.seq, local.records, name,
                ", ".join(local_files(state_dir)))
    return GroupRecovery(state, None, records=local.records, checkpoint=name)
