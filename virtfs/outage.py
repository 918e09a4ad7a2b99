"""What the agent logs while the controller is away: once, then at growing intervals.

The session retries about every second (agent.Session.run); a line per attempt
fills a log with one fact during an outage of hours. ``OutageLog`` says when a
line is worth writing: at the first failure, again at a reason not seen yet in
this outage, and otherwise after FIRST_REPEAT seconds, then at doubling intervals up to
MAX_REPEAT (so a day-long outage writes a few hundred lines, not 86,400).
Pure: the caller passes the clock (seconds, trio.current_time()).
"""

from __future__ import annotations

FIRST_REPEAT = 10.0  # seconds into an outage when it is logged a second time
MAX_REPEAT = 600.0  # the longest gap between two lines about the same outage


class OutageLog:
    """The state of one outage at a time: when it began, the last reason, the next line."""

    def __init__(self, what: str = "the controller", first_repeat: float = FIRST_REPEAT,
                 max_repeat: float = MAX_REPEAT):
        self.what = what  # what is away, for the lines: "the controller at unix:/x"
        self.first_repeat = first_repeat
        self.max_repeat = max_repeat
        self.since: float | None = None  # when the current outage began; None: none
        self.reason = ""
        self.attempts = 0
        self.seen: set[str] = set()  # reasons logged in this outage
        self._next = 0.0
        self._gap = first_repeat

    def failed(self, now: float, reason: str) -> str | None:
        """An attempt failed (or the connection was lost) at now, for reason: the line
        to log (WARNING), or None to stay quiet."""
        self.attempts += 1
        if self.since is None:
            self.since, self.reason, self.seen = now, reason, {reason}
            self._next, self._gap = now + self.first_repeat, self.first_repeat
            return f"lost {self.what}: {reason}"
        new = reason not in self.seen
        self.reason = reason
        if not new and now < self._next:
            return None
        if new:
            self.seen.add(reason)  # said at once; the schedule stays as it was
            return f"{self.what}: {reason}"
        self._gap = min(self._gap * 2, self.max_repeat)
        self._next = now + self._gap
        return (f"still no answer from {self.what} after {now - self.since:.0f} s "
                f"({self.attempts} attempts): {reason}")

    def recovered(self, now: float) -> float | None:
        """The controller is back at now: how long the outage lasted (None if there
        was none), and the log starts afresh."""
        if self.since is None:
            return None
        lasted = now - self.since
        self.since, self.reason, self.attempts, self.seen = None, "", 0, set()
        return lasted
