"""Named fault points: places in the controller and the agent that tests can make fail.

A fault point is one line, ``faultpoints.hit("journal.after_fsync")``, at a step
where a real failure could happen (a write, an fsync, a record). Tests arm points
through the environment of a real process, read once when this module is
imported, so a subprocess (virtfs-controller, virtfs-mount) can be armed without
any test hook in its command line::

    VIRTFS_FAULTS="journal.after_fsync=crash@3,movement.copy=eio@1+"

Syntax: a comma-separated list of ``NAME=ACTION[@WHEN]``:

- ACTION ``eio`` or ``enospc``: the hit raises ``OSError(EIO or ENOSPC)``, as the
  system call at that step would; ``crash``: the process kills itself with
  SIGKILL on the spot (no cleanup, no flush: as kill -9 or a power cut of that
  process; buffered file data already written stays in the page cache).
- WHEN ``N`` (default 1): only the N-th hit of that point fires (1-based);
  ``N+``: the N-th and every later hit; ``N-M``: hits N to M.

Names are listed in POINTS (docs/reliability.md says what each one tests); an
unknown name or a malformed entry is refused at import with ``ValueError``, so a
typo in a test cannot silently arm nothing. Every firing is logged at WARNING
(``fault point NAME: ACTION (hit N)``) before it acts.

Cost when unarmed: ``hit`` is a function that returns at once (no lookup, no
lock); armed, it takes a lock (hits come from worker threads too) and counts.
Call sites use ``faultpoints.hit(...)`` (an attribute lookup), so ``arm()`` in a
test process takes effect everywhere.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)

ENV = "VIRTFS_FAULTS"

# every fault point there is; a hit() with another name is a programming error
POINTS = frozenset({
    # controller/journal.py: a batch of records written, before / after its fdatasync
    "journal.before_fsync",
    "journal.after_fsync",
    # controller/service/placement.py: new space planned (nothing reserved yet),
    # zeroing it, and just before its record is queued
    "placement.plan",
    "placement.zero",
    "placement.record",
    # controller/service/movement.py: a move's steps
    "movement.start",  # L2 zeroed, before the move.start records
    "movement.copy",  # a copy between containers (faults, copier, abort's copy back)
    "movement.mark",  # the copier copied a run, before its move.mark record
    "movement.commit",  # L1 punched, before the move.commit record
    "movement.abort",  # marked blocks copied back, before the move.abort record
    # controller/service/snapshots.py: writes frozen and moves settled, before the record
    "snapshot.create",
    # virtfs/blockio.py: the agent's container I/O
    "blockio.write",  # before each pwrite to a container
    "blockio.sync",  # before each fdatasync of a container
})

ACTIONS = ("eio", "enospc", "crash")


@dataclass
class _Armed:
    action: str
    first: int  # fire on hits first..last (1-based, inclusive)
    last: float
    hits: int = 0


_armed: dict[str, _Armed] = {}
_lock = threading.Lock()


def parse(spec: str) -> dict[str, tuple[str, int, float]]:
    """Parse a VIRTFS_FAULTS value: {name: (action, first hit, last hit)}.

    Raises ValueError naming the bad entry.
    """
    out: dict[str, tuple[str, int, float]] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, eq, rest = item.partition("=")
        action, at, when = rest.partition("@")
        name, action = name.strip(), action.strip()
        if not eq or name not in POINTS:
            raise ValueError(f"{ENV}: {item!r}: unknown fault point {name!r} "
                             f"(known: {', '.join(sorted(POINTS))})")
        if action not in ACTIONS:
            raise ValueError(f"{ENV}: {item!r}: action must be one of {', '.join(ACTIONS)}")
        first, last = 1, 1.0
        if at:
            w = when.strip()
            try:
                if w.endswith("+"):
                    first, last = int(w[:-1]), float("inf")
                elif "-" in w:
                    a, b = w.split("-", 1)
                    first, last = int(a), float(int(b))
                else:
                    first = int(w)
                    last = float(first)
            except ValueError:
                raise ValueError(f"{ENV}: {item!r}: WHEN must be N, N+ or N-M") from None
            if first < 1 or last < first:
                raise ValueError(f"{ENV}: {item!r}: hits count from 1")
        out[name] = (action, first, last)
    return out


def _off(name: str) -> None:
    """hit() while nothing is armed: nothing at all."""


def _on(name: str) -> None:
    """hit() while something is armed: count the hit, fire if it is in the window."""
    a = _armed.get(name)
    if a is None:
        if name not in POINTS:
            raise ValueError(f"unknown fault point {name!r}")
        return
    with _lock:
        a.hits += 1
        n = a.hits
    if not a.first <= n <= a.last:
        return
    log.warning("fault point %s: %s (hit %d)", name, a.action, n)
    if a.action == "crash":
        for h in logging.getLogger().handlers:  # the line above, before we vanish
            try:
                h.flush()
            except Exception:  # noqa: BLE001 - dying anyway
                pass
        os.kill(os.getpid(), signal.SIGKILL)
    code = errno.EIO if a.action == "eio" else errno.ENOSPC
    raise OSError(code, f"{os.strerror(code)} (fault point {name}, hit {n})")


hit = _off
"""hit(name): a fault point. Raises OSError (EIO, ENOSPC) or kills the process when
name is armed and this hit is in its window; otherwise does nothing."""


def arm(spec: str) -> None:
    """Arm the points in spec (VIRTFS_FAULTS syntax), replacing what was armed; "" disarms.

    Hit counts start again from 0. Raises ValueError on a bad spec (nothing changes).
    """
    global hit
    parsed = parse(spec)
    with _lock:
        _armed.clear()
        for name, (action, first, last) in parsed.items():
            _armed[name] = _Armed(action, first, last)
        hit = _on if _armed else _off


def hits(name: str) -> int:
    """How many times an armed point was hit (0 if it is not armed)."""
    a = _armed.get(name)
    return a.hits if a is not None else 0


arm(os.environ.get(ENV, ""))
