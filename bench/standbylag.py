"""A hot standby's lag behind the journal's head under load (issue 14, docs/ha.md).

Real parts: one etcd member on loopback, and a hot standby (controller/standby.py's
``Standby``, the class a ``virtfs-controller --etcd`` standby runs) in a process of
its own, tailing the group's shared state dir. Its process also samples: every 10 ms
it reads the head from etcd (``head seq``) and the standby's applied ``seq``, and
every 1 ms it notes when that seq moved. For each head sample, the lag is
``head seq - seq`` in records, and in ms the time until the standby's seq reached it.

The load, for SECONDS, in two ways:

- ``standby_lag_leader``: a real ``virtfs-controller --etcd`` leader serving 64 client
  connections doing ``disk.create`` / ``disk.rm`` (bench.groupops), each reply sent once
  its record is durable: as many committed ops/s as the leader does here;
- ``standby_lag_journal``: a group term's Journal in the bench process with 64
  committers at once (no RPC): a higher record rate, the issue's 10,000 ops/s if the
  machine gives it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from controller.election import open_election
from controller.etcd import open_etcd
from controller.grouprecovery import read_head
from controller.groupstore import open_group_journal
from controller.records import ContainerAdd, DiskCreate
from controller.standby import Standby
from tests.etcdrig import ETCD, EtcdProc

from .controller import _env
from .groupops import add_container, measure, start_leader
from .report import Report, Section, Workload, percentile

TITLE = "a hot standby's lag behind the journal head under load"

REPO = Path(__file__).resolve().parent.parent
SAMPLE_S = 0.010
CLIENTS = 64


# ---------------------------------------------------------------- the standby's process


async def _standby_main(url: str, prefix: str, state_dir: str) -> dict[str, Any]:
    """Run a Standby and sample it until stdin closes; the samples."""
    heads: list[tuple[float, int]] = []  # (time read, head seq)
    moves: list[tuple[float, int]] = []  # (time seen, standby seq)
    async with open_etcd(url) as client:
        sb = Standby(state_dir, client, prefix)
        async with trio.open_nursery() as n:
            n.start_soon(sb.run)

            async def watch_seq() -> None:
                last = -1
                while True:
                    s = sb.seq
                    if s != last:
                        moves.append((time.monotonic(), s))
                        last = s
                    await trio.sleep(0.001)

            async def sample() -> None:
                while True:
                    h = await read_head(client, prefix)
                    if h is not None:
                        heads.append((time.monotonic(), h.seq))
                    await trio.sleep(SAMPLE_S)

            async def until_stdin_closes() -> None:
                await trio.to_thread.run_sync(sys.stdin.read)
                n.cancel_scope.cancel()

            n.start_soon(watch_seq)
            n.start_soon(sample)
            print("ready", flush=True)
            await until_stdin_closes()
    return {"heads": heads, "moves": moves, "applied": sb.applied,
            "full_recoveries": sb.full_recoveries}


def lags(heads: list[tuple[float, int]], moves: list[tuple[float, int]],
         t0: float, t1: float) -> tuple[list[int], list[float]]:
    """For each head sample taken in [t0, t1]: the lag in records (head seq less the
    standby's seq at that moment), and in seconds (until its seq reached the head's;
    samples it never reached are left out of the seconds)."""
    recs: list[int] = []
    secs: list[float] = []
    j = 0
    for t, h in heads:
        if not t0 <= t <= t1:
            continue
        while j + 1 < len(moves) and moves[j + 1][0] <= t:
            j += 1
        seq = moves[j][1] if moves and moves[j][0] <= t else 0
        recs.append(max(0, h - seq))
        if seq >= h:
            secs.append(0.0)
            continue
        k = j
        while k < len(moves) and moves[k][1] < h:
            k += 1
        if k < len(moves):
            secs.append(moves[k][0] - t)
    return recs, secs


class StandbyProc:
    """The standby's process (``python -m bench.standbylag child ...``): started, ready
    once it printed so; ``finish()`` closes its stdin and returns its samples."""

    def __init__(self, url: str, prefix: str, state_dir: Path, out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.standbylag", "child", url, prefix, str(state_dir),
             str(out)], cwd=REPO, env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            self.proc.kill()
            raise RuntimeError(f"the standby's process did not start: {line!r}")

    def finish(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        if self.proc.wait(60) != 0:
            raise RuntimeError(f"the standby's process failed ({self.proc.returncode})")
        data: dict[str, Any] = json.loads(self.out.read_text())
        return data


# ---------------------------------------------------------------- the loads


def _figures(w: Workload, data: dict[str, Any], t0: float, t1: float, ops: int) -> None:
    recs, secs = lags(data["heads"], data["moves"], t0, t1)
    recs.sort()
    secs.sort()
    el = t1 - t0
    w.add("committed ops/s (the load)", ops / el, "ops/s")
    w.add("head samples", len(recs), "")
    w.add("lag p50 / p99 / max, records",
          f"{percentile(recs, 50):.0f} / {percentile(recs, 99):.0f} / {max(recs, default=0)}",
          "records")
    w.add("lag p50 / p99 / max, ms",
          f"{percentile(secs, 50) * 1e3:.1f} / {percentile(secs, 99) * 1e3:.1f} / "
          f"{max(secs, default=0) * 1e3:.1f}", "ms")
    w.add("full recoveries of the standby (1 = its start)", data["full_recoveries"], "")


def _leader_load(report: Report, base: Path, etcd: EtcdProc, seconds: float) -> Workload:
    w = Workload("standby_lag_leader",
                 f"a real leader, {CLIENTS} clients doing disk.create + disk.rm",
                 {"seconds": seconds, "sample": f"{SAMPLE_S * 1e3:.0f} ms"})
    t_w = time.perf_counter()
    leader = start_leader(base, etcd, "lag")
    try:
        trio.run(add_container, leader.addr, base / "lag-c0.img")
        sb = StandbyProc(etcd.url, "/virtfs/bench-lag", base / "lag-state", base / "lag.json")
        time.sleep(1)
        report.progress(f"standby_lag: {CLIENTS} clients at the leader, {seconds:g} s")
        t0 = time.monotonic()
        r = measure(leader.addr, CLIENTS, seconds, "lag")
        t1 = time.monotonic()
        time.sleep(1)  # let the standby reach the last head
        data = sb.finish()
    finally:
        leader.stop()
    _figures(w, data, t0, t1, r["ops"])
    w.seconds = time.perf_counter() - t_w
    return w


async def _journal_load(url: str, prefix: str, state_dir: str, seconds: float,
                        t_out: list[float]) -> int:
    done = 0
    async with open_etcd(url) as client, open_election(
            client, prefix, member_id="bench", address="", ttl=10) as e:
        term = await e.campaign()
        journal, _ = await open_group_journal(state_dir, e, term)
        async with trio.open_nursery() as nursery:
            await nursery.start(journal.run)
            await journal.commit(ContainerAdd("c0", 1, "/dev/null/c0", 1 << 40, True))
            await trio.sleep(1)  # the standby recovers the start
            t_out.append(time.monotonic())
            deadline = trio.current_time() + seconds

            async def worker(k: int) -> None:
                nonlocal done
                i = 0
                while trio.current_time() < deadline:
                    await journal.commit(DiskCreate(f"d{k}-{i}", 1 << 20, 1 << 20, False,
                                                    None, 1, 1.0, []))
                    i += 1
                    done += 1

            async with trio.open_nursery() as workers:
                for k in range(CLIENTS):
                    workers.start_soon(worker, k)
            t_out.append(time.monotonic())
            nursery.cancel_scope.cancel()
        journal.close()
    return done


def _journal(report: Report, base: Path, etcd: EtcdProc, seconds: float) -> Workload:
    w = Workload("standby_lag_journal",
                 f"a group term's Journal in-process, {CLIENTS} committers (no RPC)",
                 {"seconds": seconds, "sample": f"{SAMPLE_S * 1e3:.0f} ms"})
    t_w = time.perf_counter()
    state = base / "jl-state"
    state.mkdir(mode=0o700)
    prefix = "/virtfs/bench-jl"
    report.progress(f"standby_lag: {CLIENTS} committers on the journal, {seconds:g} s")
    sb = StandbyProc(etcd.url, prefix, state, base / "jl.json")
    times: list[float] = []
    try:
        done = trio.run(_journal_load, etcd.url, prefix, str(state), seconds, times)
        time.sleep(1)
    finally:
        data = sb.finish()
    _figures(w, data, times[0], times[1], done)
    w.seconds = time.perf_counter() - t_w
    return w


def run(report: Report, section: Section) -> None:
    if ETCD is None:
        report.progress("standby_lag: etcd is not installed; skipped")
        return
    seconds = 3.0 if report.quick else 10.0
    base = Path(tempfile.mkdtemp(prefix="vbench-sl-"))
    etcd = EtcdProc(base / "etcd", base / "etcd.log").start()
    try:
        for w in (_leader_load(report, base, etcd, seconds),
                  _journal(report, base, etcd, seconds)):
            w.note("lag in records: the head's seq (read from etcd every 10 ms) less the "
                   "standby's applied seq then; in ms: from that read until the standby "
                   "had applied up to it (1 ms resolution)")
            report.emit(w)
            section.workloads.append(w)
    finally:
        etcd.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "child":
        samples = trio.run(_standby_main, *sys.argv[2:5])
        Path(sys.argv[5]).write_text(json.dumps(samples))
        sys.exit(0)
    sys.exit("run it as: python -m bench.run standby_lag")
