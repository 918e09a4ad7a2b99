"""A group journal's term in-process, for tests/etcd: ``member`` campaigns nothing, it
opens an Election on a real etcd member; ``running`` runs a Journal's committer for a
block and collects the LeadershipLost that stopped it (docs/ha.md, "The journal in a
group")."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from controller.election import Election, LeadershipLost, open_election
from controller.etcd import open_etcd
from controller.journal import Journal


@asynccontextmanager
async def member(url: str, name: str, prefix: str, ttl: int) -> AsyncIterator[Election]:
    """An Election for member name (address unix:/NAME) under prefix, with an etcd
    lease of ttl seconds, on the etcd member at url."""
    async with open_etcd(url) as client, open_election(
            client, prefix, member_id=name, address=f"unix:/{name}", ttl=ttl) as e:
        yield e


@asynccontextmanager
async def running(journal: Journal) -> AsyncIterator[list[BaseException]]:
    """Run journal's committer in the block; the list gets the LeadershipLost that
    stopped it, if one did. Closes the journal after."""
    stopped: list[BaseException] = []

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await journal.run(task_status=task_status)
        except* LeadershipLost as eg:
            stopped.extend(eg.exceptions)

    async with trio.open_nursery() as n:
        await n.start(run)
        yield stopped
        n.cancel_scope.cancel()
    journal.close()
