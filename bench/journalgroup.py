"""The journal's commit with the group's head in etcd against the local journal.

- ``commit_latency``: N commits one after another (each its own batch: write +
  fdatasync, and in a group the fenced head move in etcd), timed one by one around
  ``Journal.commit``: p50, p99 and mean, local files against a group on one local
  etcd member (tests/etcdrig.py: loopback, its data dir beside the state dir).
- ``commit_concurrent_C``: C (16, 64) committers at once for a few seconds, so batches group
  several records: acknowledged commits per second in both modes (issue 14's aim: the
  group at least 0.5x the local journal).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import trio

from controller.election import open_election
from controller.etcd import open_etcd
from controller.groupstore import open_group_journal
from controller.journal import Journal
from controller.records import ContainerAdd, DiskCreate
from controller.state import State
from tests.etcdrig import ETCD, EtcdProc

from .report import Report, Section, Workload, more_than, percentile

T = TypeVar("T")

TITLE = "journal commit: local files against the group's head in etcd"


def _disk(i: int) -> DiskCreate:
    return DiskCreate(f"d{i}", 1 << 20, 1 << 20, False, None, 1, 1.0, [])


async def _latencies(journal: Journal, n: int) -> list[float]:
    out = []
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        await journal.commit(ContainerAdd("c0", 1, "/dev/null/c0", 1 << 40, True))
        for i in range(n):
            t0 = time.perf_counter()
            await journal.commit(_disk(i))
            out.append(time.perf_counter() - t0)
        nursery.cancel_scope.cancel()
    journal.close()
    return out


async def _throughput(journal: Journal, committers: int, seconds: float) -> tuple[int, int]:
    """(acknowledged commits, batches) of committers tasks over seconds."""
    done = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        await journal.commit(ContainerAdd("c0", 1, "/dev/null/c0", 1 << 40, True))
        start = journal.commits
        deadline = trio.current_time() + seconds

        async def worker(w: int) -> None:
            nonlocal done
            i = 0
            while trio.current_time() < deadline:
                await journal.commit(_disk(w * 10_000_000 + i))
                i += 1
                done += 1

        async with trio.open_nursery() as workers:
            for w in range(committers):
                workers.start_soon(worker, w)
        batches = journal.commits - start
        nursery.cancel_scope.cancel()
    journal.close()
    return done, batches


def _in_mode(etcd: EtcdProc | None, base: Path, name: str,
             fn: Callable[[Journal], Awaitable[T]]) -> T:
    """Run fn on a fresh journal: local (etcd None) or a group's new term."""
    d = base / name
    d.mkdir()

    async def main() -> T:
        if etcd is None:
            return await fn(Journal(str(d), State()))
        async with open_etcd(etcd.url) as client, open_election(
                client, f"/bench/{name}", member_id="bench", address="", ttl=10) as e:
            term = await e.campaign()
            journal, _ = await open_group_journal(str(d), e, term)
            return await fn(journal)

    return trio.run(main)


def run(report: Report, section: Section) -> None:
    if ETCD is None:
        report.progress("journal_group: etcd is not installed; skipped")
        return
    n = 200 if report.quick else 1000
    secs = 2.0 if report.quick else 5.0
    base = Path(tempfile.mkdtemp(prefix="vbench-jg-"))
    etcd = EtcdProc(base / "etcd", base / "etcd.log").start()
    try:
        t0 = time.perf_counter()
        w = Workload("commit_latency", f"{n} commits one after another, each timed",
                     {"commits": n, "fs": os.environ.get("TMPDIR", "/tmp")})
        lat = {}
        for mode, member in (("local", None), ("group", etcd)):
            report.progress(f"journal_group: {n} commits, {mode}")
            vals = sorted(_in_mode(member, base, f"lat-{mode}", lambda j: _latencies(j, n)))
            lat[mode] = vals
            w.add(f"{mode}: commit p50", percentile(vals, 50) * 1e3, "ms")
            w.add(f"{mode}: commit p99", percentile(vals, 99) * 1e3, "ms")
            w.add(f"{mode}: commit mean", sum(vals) / len(vals) * 1e3, "ms")
        w.add("group / local, p50", percentile(lat["group"], 50) / percentile(lat["local"], 50),
              "x")
        w.seconds = time.perf_counter() - t0
        report.emit(w)
        section.workloads.append(w)

        for committers in (16, 64):
            t0 = time.perf_counter()
            t = Workload(f"commit_concurrent_{committers}",
                         f"{committers} committers for {secs:g} s",
                         {"committers": committers, "seconds": secs})
            rate = {}
            for mode, member in (("local", None), ("group", etcd)):
                report.progress(f"journal_group: {committers} committers, {mode}")
                done, batches = _in_mode(member, base, f"tp{committers}-{mode}",
                                         partial(_throughput, committers=committers,
                                                 seconds=secs))
                rate[mode] = done / secs
                t.add(f"{mode}: acknowledged commits", rate[mode], "/s")
                t.add(f"{mode}: records per batch", done / max(1, batches), "")
            t.add("group / local", rate["group"] / rate["local"], "x", more_than(0.5))
            t.seconds = time.perf_counter() - t0
            report.emit(t)
            section.workloads.append(t)
    finally:
        etcd.stop()
        shutil.rmtree(base, ignore_errors=True)
