"""virtfs.background.Background: one run of a job at a time, a rerun when asked."""

import pytest
import trio
import trio.testing

from virtfs.background import Background


async def test_a_start_while_running_does_not_start_another_run():
    bg = Background()
    release = trio.Event()
    runs = []

    async def job():
        runs.append(1)
        await release.wait()

    async with trio.open_nursery() as nursery:
        assert bg.start(nursery.start_soon, job)
        await trio.testing.wait_all_tasks_blocked()
        assert bg.running and runs == [1]
        assert not bg.start(nursery.start_soon, job)
        release.set()
    assert runs == [1] and not bg.running and not bg.again
    async with trio.open_nursery() as nursery:  # once ended, a start runs it again
        assert bg.start(nursery.start_soon, job)
    assert runs == [1, 1]


async def test_rerun_coalesces_the_starts_made_while_running_into_one_more_run():
    bg = Background(rerun=True)
    gates = [trio.Event(), trio.Event()]
    runs = []

    async def job():
        runs.append(len(runs))
        await gates[len(runs) - 1].wait()

    async with trio.open_nursery() as nursery:
        bg.start(nursery.start_soon, job)
        await trio.testing.wait_all_tasks_blocked()
        assert not bg.start(nursery.start_soon, job)
        assert not bg.start(nursery.start_soon, job)
        assert bg.again
        gates[0].set()
        await trio.testing.wait_all_tasks_blocked()
        assert runs == [0, 1] and bg.running and not bg.again
        gates[1].set()
    assert runs == [0, 1] and not bg.running


async def test_rerun_stops_when_more_says_no():
    bg = Background(rerun=True)
    release = trio.Event()
    runs = []
    wanted = [True]

    async def job():
        runs.append(1)
        await release.wait()

    async with trio.open_nursery() as nursery:
        bg.start(nursery.start_soon, job, more=lambda: wanted[0])
        await trio.testing.wait_all_tasks_blocked()
        bg.start(nursery.start_soon, job)
        wanted[0] = False
        release.set()
    assert runs == [1] and not bg.running


async def test_without_rerun_a_start_while_running_is_dropped():
    bg = Background()
    release = trio.Event()
    runs = []

    async def job():
        runs.append(1)
        await release.wait()

    async with trio.open_nursery() as nursery:
        bg.start(nursery.start_soon, job)
        await trio.testing.wait_all_tasks_blocked()
        bg.start(nursery.start_soon, job)
        assert not bg.again
        release.set()
    assert runs == [1]


async def test_a_failed_run_ends_the_run_and_its_error_goes_to_the_nursery():
    bg = Background(rerun=True)

    async def job():
        raise ValueError("boom")

    with pytest.RaisesGroup(ValueError):
        async with trio.open_nursery() as nursery:
            bg.start(nursery.start_soon, job)
    assert not bg.running


def test_a_dropped_spawn_leaves_it_running():
    bg = Background()
    spawned = []

    async def job():
        raise AssertionError("never run")

    assert bg.start(spawned.append, job)
    assert len(spawned) == 1 and bg.running
    assert not bg.start(spawned.append, job)
    assert len(spawned) == 1
