"""virtfs/qos.py's token buckets, on a clock of our own (docs/qos.md)."""

from __future__ import annotations

import pytest

from virtfs.qos import Bucket, Limiter


def test_a_bucket_bursts_one_second_then_runs_at_its_rate():
    b = Bucket(100.0, now=0.0)
    assert [b.take(1, 0.0) for _ in range(100)] == [0.0] * 100  # the burst
    assert b.take(1, 0.0) == pytest.approx(0.01)  # in debt: wait a token's time
    assert b.take(1, 0.0) == pytest.approx(0.02)
    assert b.take(1, 10.0) == 0.0  # refilled, never past one second's worth
    assert b.tokens == pytest.approx(99.0)


def test_a_large_request_is_delayed_not_refused():
    b = Bucket(1000.0, now=0.0)
    assert b.take(5000, 0.0) == pytest.approx(4.0)


def test_every_limit_that_applies_binds_and_the_deepest_debt_wins():
    lim = Limiter({"iops": 10, "write_bps": 4096}, now=0.0)
    for _ in range(10):
        lim.delay("read", 1 << 20, 0.0)  # reads take IOPS tokens, no write bytes
    assert lim.delay("read", 4096, 0.0) == pytest.approx(0.1)
    lim2 = Limiter({"iops": 1000, "write_bps": 4096}, now=0.0)
    assert lim2.delay("write", 4096, 0.0) == 0.0
    assert lim2.delay("write", 8192, 0.0) == pytest.approx(2.0)  # bytes bind, not IOPS
    assert lim2.delay("read", 8192, 0.0) == 0.0  # reads are not write-limited
