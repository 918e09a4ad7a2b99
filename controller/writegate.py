"""The write gate: whether this controller may still write its containers (docs/ha.md,
"Split brain").

Every container write the controller makes (controller/storage.py: copies, zeroing,
punches; controller/label.py: labels and heartbeats) asks a WriteGate right before its
system call, in the worker thread that makes it (``gate``). A controller that runs
alone always may (``unfenced``); a group's leader only while its term holds
(controller/group.py ``GroupTerm.may_write``), so a leader paused mid-copy past its
lease writes nothing more once it runs again. What stays open is a pause between the
check and the system call, or inside the call: microseconds; only storage-level fencing
(SCSI persistent reservations) closes that.

A leaf module (no controller imports): controller/label.py, which the agent imports
too, takes the gate from here.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

WriteGate = Callable[[], bool]
"""may_write(): whether this controller may still write its containers. Called from
worker threads before each system call that writes: it must be read-only and call no
trio function (GroupTerm.may_write: Term.in_force)."""


def unfenced() -> bool:
    """The WriteGate of a controller that runs alone: it always may write."""
    return True


class Fenced(OSError):
    """A container write refused before its system call, because the WriteGate said no:
    a group's leader whose term has ended. errno EIO, so the callers' error paths take
    it as a failed write (E_IO; a move stays for the next leader)."""


def gate(may_write: WriteGate, what: str, path: str | None = None) -> None:
    """Raise Fenced (EIO) unless may_write() says this controller may still write;
    what: the write refused, for the message ("a copy at OFFSET"); path: its file."""
    if not may_write():
        raise Fenced(errno.EIO, f"this controller no longer leads its group: {what} "
                     "not written", path)
