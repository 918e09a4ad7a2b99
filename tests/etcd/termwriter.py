"""A group leader's journal in its own process, for the kill -9 test of the head move.

    python termwriter.py ENDPOINT PREFIX STATE_DIR N

Campaigns on PREFIX (2 s lease), opens its term's journal in STATE_DIR
(controller/groupstore.py), prints ``leader TOKEN``, then commits a container and
N thin disks ``k0``..``k{N-1}`` one commit at a time, printing ``acked SEQ`` after
each. Armed with VIRTFS_FAULTS="journal.before_head=crash@K", it kills itself with
SIGKILL between the K-th batch's fdatasync and its head move.
"""

from __future__ import annotations

import logging
import os
import sys

import trio

from controller.election import open_election
from controller.etcd import open_etcd
from controller.groupstore import open_group_journal
from controller.records import ContainerAdd, DiskCreate


def say(line: str) -> None:
    print(line, flush=True)


async def main(endpoint: str, prefix: str, state_dir: str, n: int) -> None:
    async with open_etcd(endpoint, timeout=2) as etcd, open_election(
            etcd, prefix, member_id="writer", address=f"pid:{os.getpid()}", ttl=2) as e:
        term = await e.campaign()
        journal, _ = await open_group_journal(state_dir, e, term)
        say(f"leader {term.token}")
        async with trio.open_nursery() as nursery:
            await nursery.start(journal.run)
            first = ContainerAdd("c0", 1, "/dev/null/c0", 1 << 30, True)
            say(f"acked {await journal.commit(first)}")
            for i in range(n):
                rec = DiskCreate(f"k{i}", 1 << 20, 1 << 20, False, None, 1, 1.0, [])
                say(f"acked {await journal.commit(rec)}")
            nursery.cancel_scope.cancel()
        journal.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    trio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
