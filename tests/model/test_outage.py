"""virtfs/outage.py: the agent logs an outage once, then at growing intervals."""

from __future__ import annotations

from virtfs.outage import FIRST_REPEAT, MAX_REPEAT, OutageLog


def lines(log: OutageLog, start: float, seconds: float, reason: str = "gone",
          step: float = 1.0) -> list[float]:
    """Fail every step seconds for seconds: the times a line was logged."""
    out = []
    t = start
    while t < start + seconds:
        if log.failed(t, reason) is not None:
            out.append(t - start)
        t += step
    return out


def test_once_then_growing_intervals():
    log = OutageLog()
    at = lines(log, 100.0, 3600)
    assert at[:4] == [0, FIRST_REPEAT, 3 * FIRST_REPEAT, 7 * FIRST_REPEAT]
    gaps = [b - a for a, b in zip(at, at[1:], strict=False)]
    assert gaps == sorted(gaps) and max(gaps) <= MAX_REPEAT
    assert len(at) < 15  # an hour of attempts a second: 3600 lines before


def test_a_day_long_outage_writes_few_lines():
    log = OutageLog()
    assert len(lines(log, 0.0, 86400)) < 160


def test_a_new_reason_is_logged_at_once_but_flapping_is_not():
    log = OutageLog()
    assert log.failed(0, "connection lost") == "lost the controller: connection lost"
    msg = log.failed(0.05, "cannot connect: refused")
    assert msg is not None and "cannot connect: refused" in msg
    # the two reasons alternating: each already said, so only the schedule speaks
    said = [t for t in range(1, 60)
            if log.failed(float(t), "connection lost" if t % 2 else "cannot connect: refused")]
    assert said == [10, 30], said


def test_recovered_says_how_long_and_starts_afresh():
    log = OutageLog()
    assert log.recovered(5.0) is None
    log.failed(10.0, "gone")
    assert log.failed(11.0, "gone") is None
    assert log.recovered(42.5) == 32.5
    assert log.failed(50.0, "gone") == "lost the controller: gone"  # a new outage: at once
    msg = log.failed(60.0, "gone")
    assert msg == "still no answer from the controller after 10 s (2 attempts): gone"
