"""Failover of a controller group (issue 14, docs/ha.md): from a kill -9 of the leader
to the first write the new leader serves.

Real parts: one etcd member on loopback (tests/etcdrig.py), three ``virtfs-controller
--etcd`` members on one shared state dir, one ``virtfs-mount`` agent given every
member's address, a thin disk. Each trial kills the leader and at once writes 4 KiB
(O_DIRECT, then fsync) to a part of the disk never written before: the write needs an
allocation, so it completes only once a new leader serves it. The killed member is
started again as a standby before the next trial.

- ``failover_ttl_T``: the time of that write, p50 / p99 / max over the trials, with the
  leader's etcd lease T (``--etcd-ttl``; 2 s is the default, 5 s a variant beside it)
  and the agents' default 10 s lease: a failover starts within T, so most of the time
  is etcd letting the dead leader's lease expire.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.etcdrig import ETCD, EtcdProc, GroupMember
from tests.rig import MountProc, run_vdctl, wait_for

from .report import Report, Section, Workload, less_than, percentile

TITLE = "controller group failover: kill -9 of the leader to the first write served"

SEG = 4 << 20


def _trials(report: Report, base: Path, etcd: EtcdProc, ttl: int, n: int) -> list[float]:
    state = base / f"state-{ttl}"
    state.mkdir(mode=0o700)
    members = [GroupMember(base / f"t{ttl}c{i}.sock", base / f"t{ttl}c{i}.log", f"t{ttl}c{i}",
                           state, etcd.url, ["--etcd-ttl", str(ttl),
                                             "--group", f"bench-ttl-{ttl}"])  # a group each
               for i in (1, 2, 3)]
    addrs = ",".join(m.addr for m in members)
    mount = MountProc(base / f"mnt-{ttl}", base / "mnt-state", base / f"mnt-{ttl}.log",
                      controller=addrs)
    out: list[float] = []
    try:
        members[0].start()
        wait_for(members[0].leads, 20, "the first leader")
        for m in members[1:]:
            m.start()
        for args in (("container", "add", "c1", str(base / f"c-{ttl}.img"), "--size",
                      "64G"), ("disk", "create", "x", "--size", "32G")):
            r = run_vdctl("--controller", addrs, *args)
            assert r.rc == 0, r.err
        mount.start()
        fd = os.open(mount.path / "x", os.O_WRONLY | os.O_DIRECT)
        try:
            time.sleep(2 * ttl + 1)  # the standbys are up and hot
            for i in range(n):
                leader, took = trial(members, fd, i)
                out.append(took)
                report.progress(f"failover (etcd ttl {ttl} s): trial {i + 1}/{n}: "
                                f"{out[-1]:.2f} s")
                leader.start()
                time.sleep(ttl + 1)  # back as a standby, in the roster
        finally:
            os.close(fd)
    finally:
        mount.close()
        for m in members:
            m.stop()
    return out


def trial(members: list[GroupMember], fd: int, i: int) -> tuple[GroupMember, float]:
    """Trial i: kill -9 the leader, then write 4 KiB (O_DIRECT fd) to a fresh segment
    (i + 1) * 64 segments in, and fsync: (the killed leader, seconds from the kill to
    the fsync's return)."""
    leader = next(m for m in members if m.leads())
    buf = bytearray(4096)
    buf[:8] = i.to_bytes(8, "little")
    leader.kill()
    t0 = time.perf_counter()
    os.pwrite(fd, memoryview(buf), (i + 1) * 64 * SEG)
    os.fsync(fd)
    return leader, time.perf_counter() - t0


def run(report: Report, section: Section) -> None:
    if ETCD is None:
        report.progress("failover: etcd is not installed; skipped")
        return
    n = 5 if report.quick else 20
    base = Path(tempfile.mkdtemp(prefix="vbench-fo-"))
    etcd = EtcdProc(base / "etcd", base / "etcd.log").start()
    try:
        for ttl in (2, 5):
            t0 = time.perf_counter()
            w = Workload(f"failover_ttl_{ttl}",
                         f"kill -9 of the leader, then a 4 KiB allocating write + fsync; "
                         f"--etcd-ttl {ttl}{' (the default)' if ttl == 2 else ''}, agents' "
                         "lease 10 s", {"trials": n, "etcd_ttl": ttl})
            vals = sorted(_trials(report, base, etcd, ttl, n))
            w.add("failover p50", percentile(vals, 50), "s")
            w.add("failover p99", percentile(vals, 99), "s", less_than(3.0))
            w.add("failover max", vals[-1], "s")
            w.add("under the agents' 10 s lease", sum(v < 10 for v in vals) / len(vals) * 100,
                  "%")
            w.seconds = time.perf_counter() - t0
            report.emit(w)
            section.workloads.append(w)
    finally:
        etcd.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit("run it as: python -m bench.run failover")
