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
  process; buffered file data already written stays in the page cache);
  ``raise``: the hit raises ``RuntimeError``, as a bug there would;
  ``raise:KEY``, at a point whose hits carry a key (KEYED_POINTS: ``fuse.handler``,
  keyed by the FUSE handler's name): only hits with that key count and raise;
  ``hold:FILE``, at a point a trio task awaits (HOLD_POINTS: ``movement.copier``) or
  a worker thread hits (THREAD_HOLD_POINTS: ``storage.copy_chunk``, ``storage.release``):
  while FILE exists the hit waits (polling every HOLD_POLL seconds; a thread sleeps),
  then goes on.
- WHEN ``N`` (default 1): only the N-th hit of that point fires (1-based);
  ``N+``: the N-th and every later hit; ``N-M``: hits N to M. WHEN follows the
  last ``@``, so a FILE may hold ``@`` only if WHEN is given; it may not hold ``,``.

Test hooks are fault points too: ``movement.copier=hold:FILE@1+`` keeps moves half
done while FILE exists, ``storage.copy_chunk=hold:FILE@2`` parks the second chunk's
copy in its worker thread, right before its write is gated (writegate.gate),
``fuse.handler=raise:statfs@1+`` makes every statfs fail with an unexpected exception.

Names are listed in POINTS (docs/reliability.md says what each one tests); an
unknown name or a malformed entry is refused at import with ``ValueError``, so a
typo in a test cannot silently arm nothing. Every firing is logged at WARNING
(``fault point NAME: ACTION (hit N)``) before it acts (a hold: only when it waits).

Cost when unarmed: ``hit`` is a function that returns at once (no lookup, no
lock); armed, it takes a lock (hits come from worker threads too) and counts.
Call sites use ``faultpoints.hit(...)`` (an attribute lookup), so ``arm()`` in a
test process takes effect everywhere; a point in HOLD_POINTS is hit with
``await faultpoints.hit_async(...)``.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

import trio

log = logging.getLogger(__name__)

ENV = "VIRTFS_FAULTS"

# every fault point there is; a hit() with another name is a programming error
POINTS = frozenset({
    # controller/journal.py: a batch of records written, before / after its fdatasync
    "journal.before_fsync",
    "journal.after_fsync",
    # controller/groupstore.py: a group's batch fdatasync'ed, before its head moves in etcd
    "journal.before_head",
    # controller/service/placement.py: new space planned (nothing reserved yet),
    # zeroing it, and just before its record is queued
    "placement.plan",
    "placement.zero",
    "placement.record",
    # controller/service/movement.py: a move's steps
    "movement.start",  # L2 planned and reserved, before the move.start records
    "movement.copy",  # a copy between containers (faults, copier, abort's copy back)
    "movement.settle",  # the copier copied a batch, before its one flush
    "movement.mark",  # the copier's batch is durable, before its move.mark record
    "movement.publish",  # a batch marked (durably), before its push to agents
    "movement.commit",  # every block marked, L1 drained, before the move.commit record
    "movement.punch",  # move.commit durable (L1 free, held reserved), before L1's punch
    "movement.abort",  # marked blocks copied back, before the move.abort record
    "movement.copier",  # each step of the copier, before it takes the disk's lock
    # a write fault's lazy copies being settled, in the journal's worker thread, before
    # the batch holding their move.mark is written (hold:FILE stalls every commit)
    "movement.lazy_settle",
    # controller/service/faults.py: disk.sync made its record durable, before it answers
    "faults.synced",
    # controller/storage.py, in worker threads, each before its write-gate check
    # (writegate.gate): each chunk of a copy between containers; each punch of freed space
    "storage.copy_chunk",
    "storage.release",
    # controller/service/relocation.py: shared storage moved whole
    "relocate.copy",  # the bytes copied to the new place, before checking the record
    "relocate.record",  # just before the storage.relocate record
    "relocate.push",  # the record durable, before the agents get the new entries
    "relocate.punch",  # agents acknowledged, before the old range is punched
    # controller/service/snapshots.py: writes frozen and moves settled, before the record
    "snapshot.create",
    "snapshot.trim",  # snap rm: a step's storage punched, before its snap.trim record
    # virtfs/blockio.py: the agent's container I/O
    "blockio.write",  # before each pwrite to a container
    "blockio.sync",  # before each fdatasync of a container
    # virtfs/fuse_ops.py: every FUSE request, keyed by its handler's name
    "fuse.handler",
})
KEYED_POINTS = frozenset({"fuse.handler"})  # hits carry a key: raise:KEY picks them
THREAD_HOLD_POINTS = frozenset({"storage.copy_chunk", "storage.release",
                                "movement.lazy_settle"})  # worker threads
HOLD_POINTS = frozenset({"movement.copier"}) | THREAD_HOLD_POINTS  # hold:FILE works there

ACTIONS = ("eio", "enospc", "crash", "raise", "hold")
HOLD_POLL = 0.05  # seconds between looks at a hold's file


@dataclass
class _Armed:
    spec: str  # ACTION[:ARG] as armed, for the log line
    first: int  # fire on hits first..last (1-based, inclusive)
    last: float
    hits: int = 0

    @property
    def action(self) -> str:
        return self.spec.partition(":")[0]

    @property
    def arg(self) -> str | None:
        """raise's KEY or hold's FILE; None if the action has none."""
        kind, colon, arg = self.spec.partition(":")
        return arg if colon else None


_armed: dict[str, _Armed] = {}
_lock = threading.Lock()


def parse(spec: str) -> dict[str, tuple[str, int, float]]:
    """Parse a VIRTFS_FAULTS value: {name: (action with its :ARG if any, first hit, last hit)}.

    Raises ValueError naming the bad entry.
    """
    out: dict[str, tuple[str, int, float]] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, eq, rest = item.partition("=")
        action, at, when = rest.rpartition("@") if "@" in rest else (rest, "", "")
        name, action = name.strip(), action.strip()
        if not eq or name not in POINTS:
            raise ValueError(f"{ENV}: {item!r}: unknown fault point {name!r} "
                             f"(known: {', '.join(sorted(POINTS))})")
        _check_action(item, name, action)
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


def _check_action(item: str, name: str, action: str) -> None:
    """ValueError unless action (ACTION[:ARG]) is one the point name can take."""
    kind, colon, arg = action.partition(":")
    if kind not in ACTIONS:
        raise ValueError(f"{ENV}: {item!r}: action must be one of {', '.join(ACTIONS)}")
    if kind == "hold":
        if name not in HOLD_POINTS:
            raise ValueError(f"{ENV}: {item!r}: hold works only at "
                             f"{', '.join(sorted(HOLD_POINTS))}")
        if not arg:
            raise ValueError(f"{ENV}: {item!r}: hold needs a file: hold:FILE")
    elif kind == "raise" and colon:
        if name not in KEYED_POINTS:
            raise ValueError(f"{ENV}: {item!r}: {name} hits carry no key (raise:KEY works "
                             f"at {', '.join(sorted(KEYED_POINTS))})")
        if not arg:
            raise ValueError(f"{ENV}: {item!r}: raise: needs a key")
    elif colon:
        raise ValueError(f"{ENV}: {item!r}: {kind} takes no argument")


def _off(name: str, key: str | None = None) -> None:
    """hit() while nothing is armed: nothing at all."""


def _count(name: str, key: str | None) -> tuple[_Armed, int] | None:
    """Count a hit of an armed point: (its arming, the hit's number) if this hit fires."""
    a = _armed.get(name)
    if a is None:
        if name not in POINTS:
            raise ValueError(f"unknown fault point {name!r}")
        return None
    if a.action == "raise" and a.arg is not None and key != a.arg:
        return None  # another key's hit: not counted
    with _lock:
        a.hits += 1
        n = a.hits
    return (a, n) if a.first <= n <= a.last else None


def _on(name: str, key: str | None = None) -> None:
    """hit() while something is armed: count the hit, fire if it is in the window."""
    fired = _count(name, key)
    if fired is None:
        return
    a, n = fired
    if a.action == "hold":  # (parse keeps hold to HOLD_POINTS)
        if name in THREAD_HOLD_POINTS and a.arg is not None and os.path.exists(a.arg):
            log.warning("fault point %s: %s (hit %d)", name, a.spec, n)
            while os.path.exists(a.arg):  # a worker thread: blocking is its job here
                time.sleep(HOLD_POLL)
        return
    log.warning("fault point %s: %s (hit %d)", name, a.spec, n)
    if a.action == "crash":
        for h in logging.getLogger().handlers:  # the line above, before we vanish
            try:
                h.flush()
            except Exception:  # noqa: BLE001 - dying anyway
                pass
        os.kill(os.getpid(), signal.SIGKILL)
    if a.action == "raise":
        where = f"{name}: {key}" if key is not None else name
        raise RuntimeError(f"fault point {where} raises (hit {n})")
    code = errno.EIO if a.action == "eio" else errno.ENOSPC
    raise OSError(code, f"{os.strerror(code)} (fault point {name}, hit {n})")


hit = _off
"""hit(name, key=None): a fault point. Raises OSError (EIO, ENOSPC) or RuntimeError,
or kills the process, when name is armed and this hit is in its window; otherwise
does nothing. key: what this hit is about (a FUSE handler's name), for raise:KEY."""


async def hit_async(name: str) -> None:
    """hit(name) from a trio task, where an armed hold:FILE also works: while FILE
    exists the hit waits (a checkpoint every HOLD_POLL seconds), then returns."""
    a = _armed.get(name)
    if a is None or a.action != "hold":
        hit(name)
        return
    fired = _count(name, None)
    path = a.arg
    if fired is None or path is None or not os.path.exists(path):  # noqa: ASYNC240
        return
    log.warning("fault point %s: %s (hit %d)", name, a.spec, fired[1])
    while os.path.exists(path):  # noqa: ASYNC110, ASYNC240 - polls a test's file
        await trio.sleep(HOLD_POLL)


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
