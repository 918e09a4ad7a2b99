"""Fsynced metadata ops/s of a group leader (journal head in etcd) against a single
controller on local files, same run, same client load (issue 14, docs/ha.md).

Real parts: one etcd member on loopback (tests/etcdrig.py), a ``virtfs-controller
--state-dir`` (local files) and a ``virtfs-controller --etcd`` member that leads its
group alone, each on a state dir of its own on the same file system. The load is
``bench.controller``'s: C client connections (``open_controller``, as vdctl does),
each doing ``disk.create`` (1 MiB thin) then ``disk.rm`` as fast as their replies
come; every reply is sent only once its record is durable (locally: fdatasync'ed;
in the group: fdatasync'ed *and* covered by a fenced head move in etcd).

- ``group_ops``: for C in 1, 16, 64: ops/s, p50 / p99 of an op, fsyncs (batches)
  per op, in each mode, and the group / local ratio (the issue's aim: >= 0.5x).
  The two controllers take turns, ROUNDS rounds of SECONDS each per level, so a
  load change on the machine hits both; the figures are the rounds' medians.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from controller.client import open_controller
from tests.etcdrig import ETCD, EtcdProc, GroupMember
from tests.rig import cpu_seconds, wait_for

from .controller import GiB, _commit_level, _pct, controller_proc
from .report import Report, Section, Workload, more_than

TITLE = "fsynced metadata ops/s: a group leader (head in etcd) against local files"

LEVELS = (1, 16, 64)


def start_leader(base: Path, etcd: EtcdProc, name: str = "g1",
                 extra: list[str] | None = None) -> GroupMember:
    """A virtfs-controller --etcd alone in group NAME (state dir base/NAME-state), once
    it leads."""
    state = base / f"{name}-state"
    state.mkdir(mode=0o700, exist_ok=True)
    m = GroupMember(base / f"{name}.sock", base / f"{name}.log", name, state, etcd.url,
                    ["--group", f"bench-{name}", *(extra or [])])
    m.start()
    wait_for(m.leads, 30, f"{name} to lead")
    return m


async def add_container(addr: str, path: Path) -> None:
    async with open_controller(addr) as c:
        await c.call("container.add", name="c0", path=str(path), size=64 * GiB)


def measure(addr: str, clients: int, seconds: float, tag: str,
            pids: tuple[int, ...] = ()) -> dict[str, Any]:
    """One round of create+rm by clients connections for seconds at addr; with the
    CPU seconds each of pids used meanwhile (``cpu``)."""
    cpu0 = [cpu_seconds(p) for p in pids]
    r = trio.run(_commit_level, addr, clients, seconds, "create+rm", tag)
    r["cpu"] = [cpu_seconds(p) - c for p, c in zip(pids, cpu0, strict=True)]
    r["rate"] = r["ops"] / r["elapsed"]
    return r


def run(report: Report, section: Section) -> None:
    if ETCD is None:
        report.progress("group_ops: etcd is not installed; skipped")
        return
    seconds = 1.0 if report.quick else 3.0
    rounds = 1 if report.quick else 3
    base = Path(tempfile.mkdtemp(prefix="vbench-go-"))
    etcd = EtcdProc(base / "etcd", base / "etcd.log").start()
    leader: GroupMember | None = None
    t_w = time.perf_counter()
    w = Workload("group_ops", "acknowledged (fsynced) disk.create + disk.rm over RPC: "
                 "group leader against local files",
                 {"clients": ", ".join(map(str, LEVELS)), "seconds": seconds,
                  "rounds": rounds, "etcd": "one member on loopback"})
    try:
        local_dir = base / "local-state"
        with controller_proc(local_dir) as local:
            leader = start_leader(base, etcd)
            trio.run(add_container, local.addr, base / "local-c0.img")
            trio.run(add_container, leader.addr, base / "group-c0.img")
            assert leader.proc is not None
            leader_pid = leader.proc.pid
            for n in LEVELS:
                res: dict[str, list[dict[str, Any]]] = {"local": [], "group": []}
                for k in range(rounds):
                    for mode, addr, pids in (
                            ("local", local.addr, (local.pid,)),
                            ("group", leader.addr, (leader_pid, etcd.pid))):
                        report.progress(f"group_ops: {n} clients, {mode}, round {k + 1}")
                        res[mode].append(measure(addr, n, seconds, f"{mode[0]}{n}r{k}", pids))
                rate = {}
                for mode in ("local", "group"):
                    rs = res[mode]
                    rate[mode] = statistics.median(r["rate"] for r in rs)
                    lat = sorted(x for r in rs for x in r["lat"])
                    ops = sum(r["ops"] for r in rs)
                    w.add(f"{n} clients, {mode}: acked ops/s", rate[mode], "ops/s")
                    w.add(f"{n} clients, {mode}: op p50 / p99",
                          f"{_pct(lat, 50) * 1e3:.2f} / {_pct(lat, 99) * 1e3:.2f}", "ms")
                    w.add(f"{n} clients, {mode}: batches per op",
                          sum(r["commits"] for r in rs) / ops, "")
                    w.add(f"{n} clients, {mode}: controller CPU per op",
                          sum(r["cpu"][0] for r in rs) / ops * 1e6, "us")
                    if mode == "group":
                        w.add(f"{n} clients, group: etcd CPU per op",
                              sum(r["cpu"][1] for r in rs) / ops * 1e6, "us")
                w.add(f"{n} clients: group / local", rate["group"] / rate["local"], "x",
                      more_than(0.5))
    finally:
        if leader is not None:
            leader.stop()
        etcd.stop()
        shutil.rmtree(base, ignore_errors=True)
    w.note("each op is one journal record; its reply goes out once its batch is "
           "fdatasync'ed (local) and, in the group, once a txn fenced by the term's token "
           "has moved the journal head in etcd past it")
    w.seconds = time.perf_counter() - t_w
    section.workloads.append(w)
    report.emit(w)


if __name__ == "__main__":
    sys.exit("run it as: python -m bench.run group_ops")
