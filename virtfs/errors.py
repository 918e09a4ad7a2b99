"""Errors of the agent's model and the one way it calls the controller.

Everything below fuse_ops raises ``DiskError(errno)``; fuse_ops maps it to the
FUSE reply. Controller errors are translated here, once.
"""

from __future__ import annotations

import errno
from typing import Any

from controller.client import ConnectionLost
from controller.protocol import (
    E_BUSY,
    E_EXISTS,
    E_INVALID,
    E_NO_SPACE,
    E_NOT_FOUND,
    E_READONLY,
    RemoteError,
)

from .agent import ControllerUnavailable, Session

_ERRNO = {E_NOT_FOUND: errno.ENOENT, E_EXISTS: errno.EEXIST, E_INVALID: errno.EINVAL,
          E_NO_SPACE: errno.ENOSPC, E_BUSY: errno.EBUSY, E_READONLY: errno.EROFS}


class DiskError(Exception):
    """A failed operation on a disk; ``errno`` is what the FUSE caller gets."""

    def __init__(self, err: int, message: str = ""):
        super().__init__(message or errno.errorcode.get(err, str(err)))
        self.errno = err


def remote_error(e: Exception, what: str) -> DiskError:
    """A controller error (RemoteError: its code mapped; anything else: EIO) as a DiskError."""
    if isinstance(e, RemoteError):
        return DiskError(_ERRNO.get(e.code, errno.EIO), f"{what}: {e.message}")
    return DiskError(errno.EIO, f"{what}: {e}")


async def call(session: Session, op: str, what: str, *, timeout: float | None = None,
               **args: Any) -> Any:
    """session.call(op, **args) (timeout: seconds, default the session's); raises
    DiskError ("what: reason")."""
    try:
        return await session.call(op, timeout=timeout, **args)
    except (RemoteError, ControllerUnavailable, ConnectionLost) as e:
        raise remote_error(e, what) from None
