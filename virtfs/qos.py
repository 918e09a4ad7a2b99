"""Per-disk QoS at the agent: token buckets that allow bursts (docs/qos.md).

The controller keeps each disk's limits (``vdctl disk set NAME --iops-limit N
--bps-limit B``, and ``--read-*``/``--write-*``) and sends them with the
disk's table and in a "qos" push. Each limit is a bucket that refills at the
limit's rate and holds at most one second's worth (``BURST``): after a quiet
spell a disk may burst that much, then runs at the rate. An I/O takes its
tokens from every bucket that applies (ops: 1 token; bytes: its length),
going into debt if it must, and waits until the deepest debt is paid, so a
large I/O is never refused, only delayed. Pure logic (a clock is passed in)
apart from ``Limiter.admit``, which sleeps.
"""

from __future__ import annotations

from collections.abc import Mapping

import trio

# limit names, as the controller keeps them: ops/s or bytes/s, all I/O or one kind
KEYS = ("iops", "bps", "read_iops", "read_bps", "write_iops", "write_bps")
BURST = 1.0  # seconds of the rate a bucket holds (the largest burst after idling)


class Bucket:
    """A token bucket: rate tokens/s, at most rate * BURST banked; may go into debt."""

    __slots__ = ("rate", "cap", "tokens", "last")

    def __init__(self, rate: float, now: float):
        self.rate = rate
        self.cap = rate * BURST
        self.tokens = self.cap  # a fresh limit starts full
        self.last = now

    def take(self, n: float, now: float) -> float:
        """Take n tokens at time now (seconds); how long to wait until the debt, if
        any, is paid (seconds, 0 if none)."""
        self.tokens = min(self.cap, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class Limiter:
    """One disk's buckets (limits: KEYS -> rate; missing keys are unlimited)."""

    def __init__(self, limits: Mapping[str, int], now: float):
        self.limits = dict(limits)
        self._buckets = {k: Bucket(float(v), now) for k, v in limits.items() if v > 0}

    def delay(self, op: str, nbytes: int, now: float) -> float:
        """Take the tokens of one I/O (op: "read" or "write", nbytes bytes) at time now;
        the seconds it must wait before it runs."""
        wait = 0.0
        for key, n in (("iops", 1), ("bps", nbytes), (f"{op}_iops", 1),
                       (f"{op}_bps", nbytes)):
            b = self._buckets.get(key)
            if b is not None:
                wait = max(wait, b.take(n, now))
        return wait

    async def admit(self, op: str, nbytes: int) -> None:
        """Wait until one I/O of op and nbytes may run (trio clock)."""
        wait = self.delay(op, nbytes, trio.current_time())
        if wait > 0:
            await trio.sleep(wait)


def limiter(limits: object) -> Limiter | None:
    """The limiter for limits as the controller sends them (a map, or None / empty:
    unlimited, no limiter at all)."""
    if not isinstance(limits, dict) or not limits:
        return None
    clean = {k: int(v) for k, v in limits.items() if k in KEYS and isinstance(v, int) and v > 0}
    return Limiter(clean, trio.current_time()) if clean else None
