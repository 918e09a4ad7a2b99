"""Failover of a controller group whose state is a 100 TiB pool (issue 14, docs/ha.md):
from a kill -9 of the leader to the first write the new leader serves, with hot
standbys.

The state is the one ``bench.controller``'s ``scale`` workload builds: 100 thin 1 TiB
disks (10 with --quick, or ``VIRTFS_BENCH_SCALE_TIB``), every 4 MiB segment allocated,
in random order across one container (26,214,400 extents, none mergeable), as a
group's files: a term's checkpoint of it (825 MB), then 32 MiB of journal after it
(``CHECKPOINT_BYTES``, about 450,000 discard + allocation records), the head in etcd
naming its last record. The tables are built straight from their columns
(``fast_pool``: the same state, to the byte, as the ``disk.map`` records would give,
checked against ``State.apply`` at a small size), since 26 million applies take half
an hour on this machine.

Real parts then as in ``bench.failover``: one etcd member on loopback, three
``virtfs-controller --etcd`` members (default ``--etcd-ttl`` 2 s) on the shared state
dir, one ``virtfs-mount`` agent given every member's address, a small thin disk on a
real container of its own. Before each trial every standby is hot (its seq in the
roster is the head's); the trial kills the leader and at once writes 4 KiB (O_DIRECT,
fsync) where the disk was never written: the write completes only once a new leader
serves its allocation. The killed member comes back as a standby (a full recovery of
the pool) before the next trial.

- ``failover_scale``: p50 / max over the trials (aim: under 5 s), and what the members'
  logs say of the takeover.
"""

from __future__ import annotations

import json
import operator
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

import trio

from controller.election import open_election
from controller.etcd import open_etcd
from controller.extents import ExtentMap
from controller.grouprecovery import GroupRecovery, Head, head_key
from controller.groupstore import group_prefix, open_group_journal
from controller.journal import CHECKPOINT_BYTES
from controller.protocol import DEFAULT_SEGMENT_SIZE
from controller.records import ContainerAdd, DiskCreate, DiskMap
from controller.state import State
from tests.etcdrig import ETCD, EtcdProc, GroupMember
from tests.rig import MountProc, run_vdctl, wait_for

from .controller import SCALE_AIM_TIB, _env, churn
from .failover import trial
from .report import Report, Section, Workload, less_than, percentile

TITLE = "controller group failover with a 100 TiB state (hot standbys)"

TiB = 1 << 40
SEG = DEFAULT_SEGMENT_SIZE
GROUP = "bench-scale"
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- the pool's state


def fast_pool(tib: int, container_path: str, seed: int = 11) -> State:
    """A pool of tib thin 1 TiB disks p000.., every SEG-byte segment allocated, the
    segments in a random order across one container (LUN 1, exactly as big as the
    pool): the State that ContainerAdd, tib DiskCreate and one DiskMap per segment
    (in that random order, each taking the container's next segment) give through
    State.apply, built from the extent columns directly. seq is that of the last
    DiskMap."""
    nseg = TiB // SEG
    total = tib * nseg
    names = [f"p{i:03}" for i in range(tib)]
    s = State()
    s.apply(ContainerAdd("c0", 1, container_path, total * SEG, True), 1)
    for i, name in enumerate(names):
        s.apply(DiskCreate(name, TiB, SEG, False, None, 1, 1.7e9, []), 2 + i)
    order = array("q", range(total))  # k-th allocation -> global segment order[k]
    random.Random(seed).shuffle(order)
    where = array("q", bytes(8 * total))  # global segment -> its offset in the container
    for k, g in enumerate(order):
        where[g] = k * SEG
    del order
    vs = array("q", range(0, nseg * SEG, SEG)).tobytes()
    ln = array("q", [SEG]) * nseg
    lu = array("q", [1]) * nseg
    fl = array("B", bytes(nseg))
    for i, name in enumerate(names):
        d = s.disks[name]
        w = where[i * nseg:(i + 1) * nseg]
        if SEG in map(operator.sub, w[1:], w[:-1]):
            # neighbours that happen to lie one after the other merge, as apply's
            # inserts merge them (about one pair in the whole 100 TiB pool)
            starts = [k for k in range(nseg) if k == 0 or w[k] - w[k - 1] != SEG]
            ends = [*starts[1:], nseg]
            m = len(starts)
            d.extents = ExtentMap.from_wire([
                array("q", [k * SEG for k in starts]).tobytes(),
                array("q", [(e - k) * SEG for k, e in zip(starts, ends, strict=True)]).tobytes(),
                (array("q", [1]) * m).tobytes(),
                array("q", [w[k] for k in starts]).tobytes(), bytes(m)])
        else:
            d.extents = ExtentMap.from_wire([vs, ln.tobytes(), lu.tobytes(), w.tobytes(),
                                             fl.tobytes()])
        d.epoch += nseg
    s.luns[1].space.take(0, total * SEG)
    s.seq = 1 + tib + total
    return s


def slow_pool(tib_segments: int, ndisks: int, container_path: str, seed: int = 11) -> State:
    """fast_pool's state through State.apply, for disks of tib_segments segments (a
    small size: the check of fast_pool)."""
    total = ndisks * tib_segments
    names = [f"p{i:03}" for i in range(ndisks)]
    s = State()
    s.apply(ContainerAdd("c0", 1, container_path, total * SEG, True), 1)
    for i, name in enumerate(names):
        s.apply(DiskCreate(name, TiB, SEG, False, None, 1, 1.7e9, []), 2 + i)
    order = array("q", range(total))
    random.Random(seed).shuffle(order)
    seq = s.seq
    for k, g in enumerate(order):
        seq += 1
        s.apply(DiskMap(names[g // tib_segments], [(g % tib_segments * SEG, SEG, 1, k * SEG)]),
                seq)
    return s


async def _build_group(url: str, state_dir: str, tib: int, journal_bytes: int
                       ) -> dict[str, Any]:
    """The pool as the group's files: a term's checkpoint, then journal_bytes of
    records (discards and new allocations) group-committed after it; the term
    resigns at the end, leaving the head at its last record."""
    t0 = time.perf_counter()
    state = fast_pool(tib, os.path.join(state_dir, "c0.img"))
    build_s = time.perf_counter() - t0
    async with open_etcd(url) as client, open_election(
            client, "/virtfs/" + GROUP, member_id="builder", address="", ttl=60) as e:
        term = await e.campaign()
        journal, _ = await open_group_journal(state_dir, e, term,
                                              recovered=GroupRecovery(state, None),
                                              checkpoint_bytes=1 << 62)
        t0 = time.perf_counter()
        # checkpoint.TOKEN.SEQ, durable before the head names it (a worker thread: the
        # term's keep-alives go on meanwhile)
        await trio.to_thread.run_sync(journal.checkpoint_now_sync)
        ck_s = time.perf_counter() - t0
        await e.guarded_put(head_key(group_prefix(e)), Head(term.token, state.seq).encode(),
                            term.token)
        records = await churn(journal, state, sorted(state.disks), TiB // SEG, SEG,
                              journal_bytes, random.Random(13))
        journal.close()
        await e.resign()
    return {"build_s": build_s, "ck_s": ck_s, "ck_bytes": journal.last_checkpoint_bytes,
            "records": records, "seq": state.seq, "extents":
            sum(len(d.extents) for d in state.disks.values())}


# ---------------------------------------------------------------- the trials


def _status(addrs: str) -> dict[str, Any]:
    r = run_vdctl("--controller", addrs, "status", "--format", "json")
    if r.rc != 0:
        raise RuntimeError(f"vdctl status: {r.err}")
    out: dict[str, Any] = json.loads(r.out)
    return out


def _all_hot(addrs: str, members: int) -> bool:
    """Every standby's seq in the roster is the head's (and every member is in it)."""
    try:
        g = _status(addrs)["group"]
    except (RuntimeError, ValueError, KeyError):
        return False
    head = (g.get("head") or {}).get("seq")
    roster = g.get("members", [])
    standbys = [m for m in roster if m.get("role") == "standby"]
    return len(roster) == members and bool(standbys) and all(
        m.get("seq") == head for m in standbys)


TAKEOVER = re.compile(r"hot standby: taking over at seq (\d+) \(it was at (\d+)")
STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) "
ELECTED = re.compile(STAMP + r"controller\.group INFO: this member leads group", re.M)
SERVING = re.compile(STAMP + r"virtfs\.controller INFO: state dir .*: seq \d+", re.M)
AGENT = re.compile(STAMP + r"controller\.agents INFO: agent \d+ .* registered", re.M)


def _stamp(s: str) -> float:
    return time.mktime(time.strptime(s[:19], "%Y-%m-%d %H:%M:%S")) + int(s[20:]) / 1000


def takeovers(log: str) -> list[tuple[float, float]]:
    """From a member's log: for each term it won, the seconds from its election to
    its service opened on the state (the log line naming the state's seq), and to
    the first agent registered with it after that (nan if none)."""
    out = []
    for e in ELECTED.finditer(log):
        t0 = _stamp(e[1])
        s = SERVING.search(log, e.end())
        if s is None:
            continue
        a = AGENT.search(log, s.end())
        out.append((_stamp(s[1]) - t0, _stamp(a[1]) - t0 if a else float("nan")))
    return out


def run(report: Report, section: Section) -> None:
    if ETCD is None:
        report.progress("failover_scale: etcd is not installed; skipped")
        return
    tib = 10 if report.quick else int(os.environ.get("VIRTFS_BENCH_SCALE_TIB",
                                                     SCALE_AIM_TIB))
    n = 2 if report.quick else 5
    journal_bytes = CHECKPOINT_BYTES
    base = Path(tempfile.mkdtemp(prefix="vbench-fs-"))
    etcd = EtcdProc(base / "etcd", base / "etcd.log").start()
    state = base / "state"
    state.mkdir(mode=0o700)
    w = Workload("failover_scale", f"kill -9 of the leader of a {tib} TiB group, then a "
                 "4 KiB allocating write + fsync; standbys hot", {
                     "pool": f"{tib} thin 1 TiB disks, every 4 MiB segment allocated",
                     "journal after the checkpoint": f"{journal_bytes >> 20} MiB",
                     "trials": n, "etcd_ttl": 2})
    t_w = time.perf_counter()
    members: list[GroupMember] = []
    mount: MountProc | None = None
    try:
        report.progress(f"failover_scale: building the {tib} TiB group's checkpoint and "
                        "journal")
        b = _build_child(etcd.url, state, tib, journal_bytes)
        w.add("pool: extents", b["extents"], "")
        w.add("pool: checkpoint", b["ck_bytes"] / (1 << 20), "MiB")
        w.add("pool: journal after it", b["records"], "records")
        members = [GroupMember(base / f"m{i}.sock", base / f"m{i}.log", f"m{i}", state,
                               etcd.url, ["--group", GROUP]) for i in (1, 2, 3)]
        addrs = ",".join(m.addr for m in members)
        t0 = time.perf_counter()
        members[0].start()
        wait_for(members[0].leads, 900, "the first leader")
        w.add("first leader: start to leading (a full recovery)", time.perf_counter() - t0,
              "s")
        for m in members[1:]:
            m.start()
        for args in (("container", "add", "c1", str(base / "c1.img"), "--size", "64G"),
                     ("disk", "create", "x", "--size", "32G", "--container", "c1")):
            r = run_vdctl("--controller", addrs, *args)
            assert r.rc == 0, r.err
        mount = MountProc(base / "mnt", base / "mnt-state", base / "mnt.log", controller=addrs)
        mount.start()
        fd = os.open(mount.path / "x", os.O_WRONLY | os.O_DIRECT)
        out: list[float] = []
        hot: list[float] = []
        try:
            for i in range(n):
                t0 = time.perf_counter()
                wait_for(lambda: _all_hot(addrs, len(members)), 900, "hot standbys")
                hot.append(time.perf_counter() - t0)
                leader, took = trial(members, fd, i)
                out.append(took)
                report.progress(f"failover_scale: trial {i + 1}/{n}: {out[-1]:.2f} s")
                leader.start()
        finally:
            os.close(fd)
        vals = sorted(out)
        w.add("failover p50", percentile(vals, 50), "s")
        w.add("failover max", vals[-1], "s", less_than(5.0))
        w.add("a restarted standby: start to hot (p50)", percentile(sorted(hot[1:]), 50)
              if len(hot) > 1 else float("nan"), "s")
        # the takeovers after a kill (not the first leader's: it recovered in full)
        steps = sorted((x for mem in members for x in takeovers(mem.log())),
                       key=lambda x: x[0])[:-1] if members else []
        if steps:
            w.add("takeover: elected to serving, max", max(x[0] for x in steps) * 1e3, "ms")
            w.add("takeover: elected to the agent registered, max",
                  max(x[1] for x in steps), "s")
        took = [m for mem in members for m in TAKEOVER.finditer(mem.log())]
        if took:
            w.note("takeovers: " + "; ".join(f"at seq {a}, the standby was at {b_}"
                                            for a, b_ in (t.groups() for t in took)))
    finally:
        if mount is not None:
            mount.close()
        for m in members:
            m.stop()
        etcd.stop()
        w.seconds = time.perf_counter() - t_w
        if os.environ.get("VIRTFS_BENCH_KEEP"):
            report.progress(f"failover_scale: kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    report.emit(w)
    section.workloads.append(w)


def _build_child(url: str, state_dir: Path, tib: int, journal_bytes: int) -> dict[str, Any]:
    """_build_group in a process of its own (its gigabytes go when it ends)."""
    r = subprocess.run([sys.executable, "-m", "bench.failoverscale", "build", url,
                        str(state_dir), str(tib), str(journal_bytes)], cwd=REPO, env=_env(),
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"failover_scale: the build failed ({r.returncode}):\n"
                           f"{r.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "build":
        print(json.dumps(trio.run(_build_group, sys.argv[2], sys.argv[3], int(sys.argv[4]),
                                  int(sys.argv[5]))))
        sys.exit(0)
    sys.exit("run it as: python -m bench.run failover_scale")
