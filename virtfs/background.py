"""Run once in the background: one run of a job at a time, per disk and job.

An open disk has a few jobs that run in the background and must not pile up: a
table reload, the settling of its size and times, the times timer, allocation
ahead. Each is a ``Background``; pure logic (the caller hands in how to spawn).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

Job = Callable[[], Awaitable[None]]
Spawn = Callable[[Job], None]  # start a task in a nursery (e.g. Session.start_soon)


def _always() -> bool:
    return True


class Background:
    """One background run of a job at a time.

    start() spawns the job unless a run is going. With rerun, a start while a run is
    going asks that run to go once more when it ends (it may have looked before the
    change that asked for it); many such starts make one more run, and the extra
    runs stop as soon as more() says no. ``running`` is true from start() until the
    run ends (also when it fails; its exception goes to the nursery).
    """

    def __init__(self, rerun: bool = False) -> None:
        self.rerun = rerun
        self.running = False
        self.again = False  # a start came while running (rerun only)

    def start(self, spawn: Spawn, job: Job, more: Callable[[], bool] = _always) -> bool:
        """Spawn job unless a run is going (then, with rerun, ask it for one more).

        spawn: starts a task (if it drops the task, ``running`` stays true: nothing
        is run again). Returns whether a run was started.
        """
        if self.running:
            if self.rerun:
                self.again = True
            return False
        self.running = True
        self.again = False
        spawn(partial(self._run, job, more))
        return True

    async def _run(self, job: Job, more: Callable[[], bool]) -> None:
        try:
            while True:
                await job()
                if not self.again or not more():
                    return
                self.again = False
        finally:
            self.running = False
