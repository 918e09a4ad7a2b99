"""The state dir: where it is by default, the names of the files in it, and its lock.

Shared by virtfs-controller, virtfs-mount and vdctl; imports nothing else from
the controller, so vdctl finds the socket without loading the service.
docs/architecture.md ("The journal") lists every file.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os

log = logging.getLogger("virtfs.controller")

ENV = "VIRTFS_STATE_DIR"
SOCKET = "controller.sock"  # the controller's Unix socket (0600)
LOCK = "lock"  # flock'ed by the running controller, holds its pid


def default_state_dir() -> str:
    """$VIRTFS_STATE_DIR (made absolute), else ~/.local/state/virtfs."""
    env = os.environ.get(ENV)
    if env:
        return os.path.abspath(env)
    return os.path.join(os.path.expanduser("~"), ".local", "state", "virtfs")


def default_socket(state_dir: str) -> str:
    """The address of the controller's socket in state_dir: ``unix:STATE_DIR/controller.sock``."""
    return "unix:" + os.path.join(state_dir, SOCKET)


class StateDirBusy(Exception):
    """The state dir cannot be used by this controller: another one holds it, or it
    is not the kind of state dir this controller runs on (a group's, a standalone's)."""


def lock_state_dir(state_dir: str) -> int:
    """An exclusive flock on STATE_DIR/lock, held for the process's life (a standalone
    controller), or while a group's first leader adopts a standalone's journal
    (controller/adoption.py). Absolute path.

    Makes the dir (0700) if it is missing, and an existing one 0700 (with a warning)
    if group or others had any access. Raises StateDirBusy, OSError."""
    if os.path.exists(state_dir) and not os.path.isdir(state_dir):
        raise StateDirBusy(f"state dir {state_dir} exists and is not a directory")
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    mode = os.stat(state_dir).st_mode & 0o777
    if mode & 0o077:
        # the journal says where every disk's data lies, and the socket takes admin
        # requests from whoever can reach it: owner only, as a new state dir is made
        os.chmod(state_dir, 0o700)
        log.warning("state dir %s was mode %04o; made it 0700 (owner only)", state_dir, mode)
    fd = os.open(os.path.join(state_dir, LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StateDirBusy(f"state dir {state_dir} is in use by another controller "
                               f"(pid {holder})") from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
