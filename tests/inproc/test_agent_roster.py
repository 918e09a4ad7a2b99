"""controller/roster.py: the agents' roster on a real directory, and the grace rule of
controller/agents.py it feeds (docs/fencing.md, "After a restart")."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from controller.agents import LEASE_MARGIN, AgentRegistry
from controller.roster import Roster
from controller.writegate import Fenced

T1, T2 = "a" * 32, "b" * 32


async def _nothing(msg: object) -> None:
    pass


def test_roster_belongs_to_one_run(tmp_path: Path) -> None:
    r = Roster(str(tmp_path / "agents.roster"))
    assert r.load(1) is None  # none yet
    r.set_boot(1)
    r.add(T1)
    r.add(T2)
    assert r.load(1) == {T1, T2}
    assert r.load(2) is None  # another run's: nothing known
    r.remove(T1)
    r.remove(T1)  # gone already: nothing to do
    assert r.load(1) == {T2}
    r.clear()
    assert r.load(1) == set()
    with pytest.raises(OSError):
        r.add("../x")


def test_a_deposed_leader_writes_no_roster_entry(tmp_path: Path) -> None:
    r = Roster(str(tmp_path / "agents.roster"))
    r.set_boot(1)
    r.add(T1)
    r.may_write = lambda: False
    with pytest.raises(Fenced):
        r.add(T2)
    with pytest.raises(Fenced):
        r.remove(T1)
    assert r.load(1) == {T1}


def _previous_run(tmp_path: Path, tokens: list[str], boot: int = 1) -> tuple[str, str]:
    marker, roster = str(tmp_path / "agents.live"), str(tmp_path / "agents.roster")
    Path(marker).touch()
    r = Roster(roster)
    r.set_boot(boot)
    for t in tokens:
        r.add(t)
    return marker, roster


async def test_grace_ends_when_every_listed_session_is_current(tmp_path: Path) -> None:
    marker, roster = _previous_run(tmp_path, [T1, T2])
    reg = AgentRegistry(6.0, marker, roster)
    reg.load_roster(1)
    assert reg.pending == {T1, T2}
    a1 = await reg.enroll("a1", "h", "/m", _nothing, token=T1)
    a2 = await reg.enroll("a2", "h", "/m2", _nothing, token=T2)
    reg.current(a1)
    assert not reg.settled.is_set()  # a2 registered but has not heartbeat (reloading)
    reg.current(a2)
    with trio.fail_after(0.1):
        await reg.wait_grace()


async def test_grace_runs_to_the_deadline_for_a_session_not_back(tmp_path: Path,
                                                                  autojump_clock) -> None:
    marker, roster = _previous_run(tmp_path, [T1, T2])
    reg = AgentRegistry(6.0, marker, roster)
    reg.load_roster(1)
    reg.current(await reg.enroll("a1", "h", "/m", _nothing, token=T1))
    t0 = trio.current_time()
    await reg.wait_grace()
    assert trio.current_time() - t0 == pytest.approx(6.0 + LEASE_MARGIN, abs=0.01)


async def test_no_roster_of_the_previous_run_means_the_whole_lease(tmp_path: Path,
                                                                   autojump_clock) -> None:
    marker, roster = _previous_run(tmp_path, [T1], boot=1)
    for boot in (2, None):  # another run's roster (a version without one ran between)
        reg = AgentRegistry(6.0, marker, roster if boot else None)
        reg.load_roster(boot or 0)
        reg.current(await reg.enroll("a1", "h", "/m", _nothing, token=T1))
        t0 = trio.current_time()
        await reg.wait_grace()
        assert trio.current_time() - t0 == pytest.approx(6.0 + LEASE_MARGIN, abs=0.01)
