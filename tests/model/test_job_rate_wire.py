"""A job's copy rate limit (docs/movement.md, "Rate and priority") survives the journal
and checkpoints, and journals and checkpoints written before it still load."""

from __future__ import annotations

from controller.records import JobStart
from controller.tables import Job


def test_job_start_carries_the_rate_and_older_records_load_without_it():
    r = JobStart(1, "migrate", "d", None, 2, 1.5, (), 32 << 20)
    w = r.to_wire()
    assert w["rate"] == 32 << 20
    assert JobStart.from_wire(w) == r
    old = JobStart(1, "migrate", "d", None, 2, 1.5)
    assert "rate" not in old.to_wire()  # written byte for byte as before
    assert JobStart.from_wire(old.to_wire()).rate == 0


def test_job_checkpoint_round_trip_with_and_without_a_rate():
    j = Job(1, "migrate", "d", None, 2, 1.5, rate=50 << 20)
    assert Job.from_wire(j.to_wire()).rate == 50 << 20
    plain = Job(1, "migrate", "d", None, 2, 1.5, placed=[("d", 1, None)])
    assert len(plain.to_wire()) == 11 and Job.from_wire(plain.to_wire()) == plain
    assert len(Job(1, "drain", None, 1, None, 1.5).to_wire()) == 10
