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
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.etcdrig import ETCD, EtcdProc
from tests.rig import BIN, MountProc, run_vdctl, wait_for

from .report import Report, Section, Workload, less_than, percentile

TITLE = "controller group failover: kill -9 of the leader to the first write served"

SEG = 4 << 20


class _Member:
    def __init__(self, base: Path, name: str, state: Path, etcd: str, ttl: int) -> None:
        self.name = name
        self.addr = f"unix:{base / f'{name}.sock'}"
        self.log = base / f"{name}.log"
        self.cmd = [str(BIN / "virtfs-controller"), "--state-dir", str(state), "--listen",
                    self.addr, "--etcd", etcd, "--etcd-ttl", str(ttl), "--member-id", name,
                    "--group", f"bench-ttl-{ttl}"]  # each state dir its own group
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)

    def leads(self) -> bool:
        text = self.log.read_text(errors="replace").split("stepped down")[-1]
        return self.proc is not None and self.proc.poll() is None and "leading group" in text

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        with open(self.log, "ab") as out:  # a fresh log section for leads()
            out.write(b"\n--- killed: stepped down ---\n")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _trials(report: Report, base: Path, etcd: EtcdProc, ttl: int, n: int) -> list[float]:
    state = base / f"state-{ttl}"
    state.mkdir(mode=0o700)
    members = [_Member(base, f"t{ttl}c{i}", state, etcd.url, ttl) for i in (1, 2, 3)]
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
        buf = bytearray(4096)
        try:
            time.sleep(2 * ttl + 1)  # the standbys are up and hot
            for i in range(n):
                leader = next(m for m in members if m.leads())
                buf[:8] = i.to_bytes(8, "little")
                leader.kill()
                t0 = time.perf_counter()
                os.pwrite(fd, memoryview(buf), (i + 1) * 64 * SEG)  # a fresh segment
                os.fsync(fd)
                out.append(time.perf_counter() - t0)
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
