"""Readiness and stop notices to systemd (``Type=notify``): the sd_notify protocol.

A service manager that starts us with ``NOTIFY_SOCKET`` set listens on that Unix
datagram socket (a path, or ``@NAME`` in the abstract namespace) for newline-
separated ``KEY=VALUE`` fields: ``READY=1`` once the service does its job,
``STOPPING=1`` when it begins to stop, ``STATUS=...`` a line for ``systemctl
status`` (sd_notify(3), "The NOTIFY_SOCKET protocol" in systemd's docs).

It is one datagram, so this module sends it itself rather than pull in a
library: python-systemd and cysystemd need libsystemd and a C build, and the
pure-Python ``sdnotify`` is unmaintained since 2017. Used by virtfs-controller
(ready once it listens) and virtfs-mount (ready once the kernel's FUSE INIT is
answered). examples/systemd/ has the units.

Never raises: a notice that cannot be sent is logged once and dropped, as
libsystemd's sd_notify reports and goes on; a service must not fail because its
manager went away.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

ENV = "NOTIFY_SOCKET"
_warned = False


def notify_address(env: Mapping[str, str] | None = None) -> str | None:
    """The socket address NOTIFY_SOCKET names (abstract ``@NAME`` -> ``\\0NAME``), or None
    if it is unset, empty, or of a kind we do not speak (``vsock:``, relative paths)."""
    addr = (os.environ if env is None else env).get(ENV, "")
    if addr.startswith("@"):
        return "\0" + addr[1:]
    if addr.startswith("/"):
        return addr
    if addr:
        _warn_once(f"{ENV}={addr!r} is not a Unix socket path or @NAME; readiness not sent")
    return None


def notify(*fields: str, env: Mapping[str, str] | None = None) -> bool:
    """Send fields (``"READY=1"``, ``"STATUS=..."``) as one datagram to $NOTIFY_SOCKET.

    True if it was sent; False if there is no NOTIFY_SOCKET (not run by a service
    manager) or the send failed (logged once). Never blocks: the socket is
    non-blocking and a full queue drops the notice.
    """
    addr = notify_address(env)
    if addr is None:
        return False
    msg = "\n".join(fields).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.setblocking(False)
            s.sendto(msg, addr)
    except OSError as e:
        _warn_once(f"cannot notify the service manager at {addr.lstrip(chr(0))}: "
                   f"{e.strerror or e}")
        return False
    return True


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("%s", message)
