"""The agents' roster: which agent sessions may hold a lease of this controller
(docs/fencing.md, "After a restart").

A directory in the state dir (``agents.roster``, shared by a group's members like the
rest of the state dir) with one empty file per agent session, named by the session's
token (lower-case hex, 16 to 64 digits: a random number each agent process draws, sent in
agent.register), and a file ``boot`` naming the controller run (the journal's boot
number, records.ControllerBoot) that keeps the roster. An entry is made durable before
the registration is answered and removed once the session signed off or its lease ran
out. A controller that starts trusts the entries only if ``boot`` names the run before it
(the journal's last boot): a run of a version without a roster in between journaled a
boot of its own, and its agents are in no roster, so the next start then waits out a
whole lease as before (AgentRegistry).

Every method writes or reads files: call them in a worker thread. Writes ask the write
gate first (controller/writegate.py): a group's deposed leader neither adds nor removes
an entry (Fenced, an OSError).
"""

from __future__ import annotations

import errno
import os
import re

from .fsutil import fsync_dir, write_all
from .writegate import WriteGate, gate, unfenced

TOKEN = re.compile(r"[0-9a-f]{16,64}")
BOOT_FILE = "boot"


def valid_token(token: str) -> bool:
    """Whether token can name a roster entry: 16 to 64 lower-case hex digits."""
    return TOKEN.fullmatch(token) is not None


class Roster:
    """The roster directory at path; may_write: the controller's write gate."""

    def __init__(self, path: str, may_write: WriteGate = unfenced):
        self.path = path
        self.may_write = may_write

    def load(self, boot: int) -> set[str] | None:
        """The tokens listed, if the roster belongs to controller run boot (the previous
        run); None if there is none, or it belongs to another run, or cannot be read
        (the caller then knows nothing of the previous run's agents)."""
        try:
            with open(os.path.join(self.path, BOOT_FILE), encoding="ascii") as f:
                if int(f.read().strip()) != boot:
                    return None
            return {n for n in os.listdir(self.path) if valid_token(n)}
        except (OSError, ValueError):
            return None

    def set_boot(self, boot: int) -> None:
        """Make this roster run boot's, durably (written aside, renamed over).
        Fenced or OSError on failure."""
        gate(self.may_write, "the agents' roster", self.path)
        self._make_dir()
        tmp = os.path.join(self.path, BOOT_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            write_all(fd, f"{boot}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, os.path.join(self.path, BOOT_FILE))
        fsync_dir(self.path)

    def _make_dir(self) -> None:
        if not os.path.isdir(self.path):
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            fsync_dir(os.path.dirname(self.path))

    def add(self, token: str) -> None:
        """List token, durably. Fenced or OSError on failure."""
        if not valid_token(token):
            raise OSError(errno.EINVAL, f"not a roster token: {token!r}")
        gate(self.may_write, "an entry of the agents' roster", self.path)
        self._make_dir()
        fd = os.open(os.path.join(self.path, token), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.path)

    def remove(self, token: str) -> None:
        """Unlist token (gone already: nothing to do). Not synced: an entry that comes
        back after a crash only makes the next start wait longer. Fenced or OSError."""
        if not valid_token(token):
            return
        gate(self.may_write, "the removal of an entry of the agents' roster", self.path)
        try:
            os.unlink(os.path.join(self.path, token))
        except FileNotFoundError:
            pass

    def clear(self) -> None:
        """Unlist every entry (a clean stop with no agent left). Fenced or OSError."""
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return
        for name in names:
            if valid_token(name):
                self.remove(name)
