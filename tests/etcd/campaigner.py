"""A campaigner as its own process, for tests that freeze it (SIGSTOP) while it leads.

    python campaigner.py ENDPOINTS PREFIX MEMBER TTL DATA_KEY

Campaigns on PREFIX; once leader, prints ``leader TOKEN``, then writes
``MEMBER I`` to DATA_KEY with guarded_put every 0.1 s, printing ``put I REVISION`` for
each write etcd took and ``refused REASON`` for the first it fenced; prints
``lost REASON`` as soon as the term ends, and exits 0 once both the writes stopped
and the term ended. One line per event on stdout, flushed.
"""

from __future__ import annotations

import logging
import os
import sys

import trio

from controller.election import LeadershipLost, open_election
from controller.etcd import open_etcd


def say(line: str) -> None:
    print(line, flush=True)


async def main(endpoints: str, prefix: str, member: str, ttl: int, key: str) -> None:
    async with open_etcd(endpoints, timeout=1) as etcd, open_election(
            etcd, prefix, member_id=member, address=f"pid:{os.getpid()}", ttl=ttl) as e:
        term = await e.campaign()
        say(f"leader {term.token}")

        async def report_lost() -> None:
            say(f"lost {await term.wait_lost()}")

        async with trio.open_nursery() as n:
            n.start_soon(report_lost)
            i = 0
            while True:
                try:
                    rev = await e.guarded_put(key, f"{member} {i}", term.token)
                except LeadershipLost as err:
                    say(f"refused {err}")
                    break
                say(f"put {i} {rev}")
                i += 1
                await trio.sleep(0.1)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    trio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
