"""The state dir: where it is by default and the names of the files in it.

Shared by virtfs-controller, virtfs-mount and vdctl; imports nothing else from
the controller, so vdctl finds the socket without loading the service.
docs/architecture.md ("The journal") lists every file.
"""

from __future__ import annotations

import os

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
