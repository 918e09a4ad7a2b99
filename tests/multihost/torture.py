"""A model-based torture run (our own fsx): random I/O and image operations on real mounts.

A seeded random mix of operations on a few thin disks, through two agents
(virtfs-mount) of one standalone controller, each checked against an in-memory
model (a bytearray per disk; a snapshot gets its own copy):

- data: pwrite, pread (checked), ftruncate, fsync, fallocate PUNCH_HOLE|KEEP_SIZE,
  ZERO_RANGE (with and without KEEP_SIZE); each opens the file in one of the mounts
  and closes it after, so the other mount sees the change (its page cache is
  dropped at open) and no handle is open during the image operations;
- image: vdctl disk resize, a clean agent restart, kill -9 of an agent and of the
  controller (each then restarted), disk migrate to the other container (half the
  time with --no-wait, so the data operations run while segments move), snap
  create, reads of NAME@SNAP (checked against the snapshot's model), disk clone,
  snap rollback, snap rm.

Only fsync'ed data must survive a kill -9 of an agent: the model keeps each disk's
content as of its last fsync, and after the kill every byte must read as either
that or the latest content (and anything past both sizes as zeros); what was read
becomes the model. A controller kill -9 loses nothing (every answer was durable).

At the end every disk is fsync'ed, both agents are unmounted (exit 0), a fresh agent
mounts, and every disk and snapshot is compared byte for byte; ``vdctl check``
must find no corruption. On a failure, TortureFailure says the seed and the last
operations.

Run from pytest (tests/multihost/test_torture.py) or by hand:

    .venv/bin/python tests/multihost/torture.py --seed 7 --ops 20000 [--dir DIR] [--keep]

(``make torture SEED=7 OPS=20000``). Needs root and FUSE, as the test suite does.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import ctypes.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared rig
from rig import MountProc  # noqa: E402

from controller.protocol import snapshot_name, split_snapshot_name  # noqa: E402

BIN = Path(sys.executable).parent
SEG = 64 << 10  # small segments: ops cross segment boundaries, holes and partial blocks
MAX_SIZE = 3 << 20  # largest a disk grows to
MAX_IO = 160 << 10  # largest read or write
MAX_DISKS = 4
MAX_SNAPS = 4
LEASE = "2"
HISTORY = 40  # operations shown on a failure

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with any mode; OSError on failure."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class TortureFailure(AssertionError):
    """The system disagreed with the model (or an operation failed)."""

    reported = False  # True once it carries the seed and the last operations


class Controller:
    """A virtfs-controller subprocess (kill -9 and restart at will)."""

    def __init__(self, work: Path):
        self.state = work / "state"
        self.log_path = work / "controller.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "virtfs-controller"), "--state-dir", str(self.state),
                 "--lease", LEASE], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while self.vdctl("status", check=False)[0] != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise TortureFailure(f"controller did not start (rc {self.proc.poll()}):\n"
                                     + self.log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def vdctl(self, *args: str, check: bool = True) -> tuple[int, str, str]:
        """vdctl in a subprocess (its own trio loop, never ours): (rc, stdout, stderr)."""
        p = subprocess.run([str(BIN / "vdctl"), "--state-dir", str(self.state), *args],
                           capture_output=True, text=True, timeout=120)
        if check and p.returncode != 0:
            raise TortureFailure(f"vdctl {' '.join(args)}: rc {p.returncode}: {p.stderr}")
        return p.returncode, p.stdout, p.stderr

    def json(self, *args: str) -> Any:
        return json.loads(self.vdctl(*args, "--format", "json")[1])


class Torture:
    """One seeded run. run() raises TortureFailure with the seed and the last ops."""

    def __init__(self, work: Path, seed: int, ops: int, *, mounts: int = 2,
                 verbose: bool = False):
        self.work = work
        self.seed = seed
        self.ops = ops
        self.nmounts = mounts
        self.verbose = verbose
        self.rng = random.Random(seed)
        self.ctl = Controller(work)
        self.mounts: list[MountProc | None] = [None] * mounts
        self.models: dict[str, bytearray] = {}
        self.synced: dict[str, bytes] = {}  # content as of the disk's last fsync
        self.snaps: dict[str, bytes] = {}  # NAME@SNAP -> content
        self.history: collections.deque[str] = collections.deque(maxlen=HISTORY)
        self.counts: collections.Counter[str] = collections.Counter()
        self.step = 0
        self._names = 0
        work.mkdir(parents=True, exist_ok=True)
        self.oplog = open(work / "ops.log", "a", buffering=1)  # noqa: SIM115 - closed in close()

    # ------------------------------------------------------------ plumbing
    def note(self, what: str) -> None:
        self.history.append(f"#{self.step} {what}")
        self.oplog.write(self.history[-1] + "\n")
        if self.verbose:
            print(self.history[-1], flush=True)

    def fail(self, why: str) -> TortureFailure:
        e = TortureFailure(
            f"torture seed {self.seed} failed at op #{self.step}: {why}\n"
            f"rerun: make torture SEED={self.seed} OPS={self.ops}\n"
            f"last operations:\n  " + "\n  ".join(self.history)
            + f"\nlogs (every operation in ops.log): {self.work}")
        e.reported = True
        return e

    def mount(self, k: int) -> MountProc:
        m = self.mounts[k]
        if m is None:
            m = MountProc(self.work / f"m{k}", self.ctl.state, self.work / f"m{k}.log",
                          controller=f"unix:{self.ctl.state / 'controller.sock'}",
                          args=["--fault-timeout", "20"])
            self.mounts[k] = m.start()
        return m

    def path(self, name: str, k: int | None = None) -> Path:
        return self.mount(self.rng.randrange(self.nmounts) if k is None else k).path / name

    def new_name(self, prefix: str) -> str:
        self._names += 1
        return f"{prefix}{self._names}"

    # ------------------------------------------------------------ set-up, tear-down
    def setup(self) -> None:
        self.ctl.state.mkdir(parents=True, exist_ok=True)
        self.ctl.start()
        for c in ("c1", "c2"):
            self.ctl.vdctl("container", "add", c, str(self.work / f"{c}.img"), "--size", "256M")
        for _ in range(2):
            name = self.new_name("d")
            size = self.rng.randrange(SEG, MAX_SIZE // 2)  # a segment is at most the disk
            self.ctl.vdctl("disk", "create", name, "--size", str(size), "--segment-size",
                           str(SEG))
            self.models[name] = bytearray(size)
            self.synced[name] = bytes(size)
        for k in range(self.nmounts):
            self.mount(k)

    def close(self) -> None:
        for m in self.mounts:
            if m is not None:
                m.close()
        self.ctl.stop()
        self.oplog.close()

    # ------------------------------------------------------------ data operations
    def _open(self, name: str, k: int | None = None) -> tuple[int, int]:
        k = self.rng.randrange(self.nmounts) if k is None else k
        return os.open(self.path(name, k), os.O_RDWR), k

    def _check_size(self, fd: int, name: str, where: str) -> None:
        size = os.fstat(fd).st_size
        if size != len(self.models[name]):
            raise self.fail(f"{name}: size {size} through {where}, model "
                            f"{len(self.models[name])}")

    def _check_read(self, name: str, off: int, got: bytes, want: bytes, where: str) -> None:
        if got != want:
            bad = next((i for i in range(min(len(got), len(want))) if got[i] != want[i]),
                       min(len(got), len(want)))
            raise self.fail(f"{where}: read of {name} [{off}, +{len(want)}) differs at byte "
                            f"{off + bad} (got {len(got)} bytes: {got[bad:bad + 8].hex()}, "
                            f"want {want[bad:bad + 8].hex()})")

    def op_write(self, name: str) -> None:
        m = self.models[name]
        off = self.rng.randrange(0, MAX_SIZE - 1)
        n = min(self.rng.randrange(1, MAX_IO), MAX_SIZE - off)
        data = self.rng.randbytes(n)
        fd, k = self._open(name)
        self.note(f"write {name} m{k} [{off}, +{n})")
        try:
            if os.pwrite(fd, data, off) != n:
                raise self.fail("short write")
            if off + n > len(m):
                m.extend(bytes(off + n - len(m)))
            m[off : off + n] = data
            self._check_size(fd, name, f"m{k}")
        finally:
            os.close(fd)

    def op_read(self, name: str) -> None:
        m = self.models[name]
        off = self.rng.randrange(0, MAX_SIZE)
        n = self.rng.randrange(1, MAX_IO)
        fd, k = self._open(name)
        self.note(f"read {name} m{k} [{off}, +{n})")
        try:
            self._check_size(fd, name, f"m{k}")
            got = os.pread(fd, n, off)
        finally:
            os.close(fd)
        self._check_read(name, off, got, bytes(m[off : off + n]), f"m{k}")

    def op_truncate(self, name: str) -> None:
        m = self.models[name]
        size = self.rng.randrange(0, MAX_SIZE)
        fd, k = self._open(name)
        self.note(f"truncate {name} m{k} {size}")
        try:
            os.ftruncate(fd, size)
            if size < len(m):
                del m[size:]
            else:
                m.extend(bytes(size - len(m)))
            self._check_size(fd, name, f"m{k}")
        finally:
            os.close(fd)

    def op_fsync(self, name: str) -> None:
        fd, k = self._open(name)
        self.note(f"fsync {name} m{k}")
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.synced[name] = bytes(self.models[name])

    def op_punch(self, name: str) -> None:
        self._falloc(name, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, "punch")

    def op_zero(self, name: str) -> None:
        keep = self.rng.random() < 0.5
        self._falloc(name, FALLOC_FL_ZERO_RANGE | (FALLOC_FL_KEEP_SIZE if keep else 0),
                     "zero-range" + (" keep-size" if keep else ""))

    def _falloc(self, name: str, mode: int, what: str) -> None:
        m = self.models[name]
        off = self.rng.randrange(0, MAX_SIZE - 1)
        n = min(self.rng.choice([self.rng.randrange(1, 3 * SEG), self.rng.randrange(1, MAX_IO)]),
                MAX_SIZE - off)
        fd, k = self._open(name)
        self.note(f"{what} {name} m{k} [{off}, +{n})")
        try:
            fallocate(fd, mode, off, n)
            if not mode & FALLOC_FL_KEEP_SIZE and off + n > len(m):
                m.extend(bytes(off + n - len(m)))
            lo, hi = min(off, len(m)), min(off + n, len(m))
            m[lo:hi] = bytes(hi - lo)
            self._check_size(fd, name, f"m{k}")
        finally:
            os.close(fd)

    # ------------------------------------------------------------ image operations
    def op_resize(self, name: str) -> None:
        size = self.rng.randrange(1, MAX_SIZE)
        self.note(f"vdctl disk resize {name} {size}")
        self.ctl.vdctl("disk", "resize", name, str(size), "--allow-shrink")
        m = self.models[name]
        if size < len(m):
            del m[size:]
        else:
            m.extend(bytes(size - len(m)))

    def op_agent_restart(self, _name: str) -> None:
        k = self.rng.randrange(self.nmounts)
        m = self.mount(k)
        self.note(f"agent m{k}: unmount, mount again")
        rc = m.unmount()
        if rc != 0:
            raise self.fail(f"agent m{k} exited {rc} on a clean unmount:\n{m.log()[-2000:]}")
        self.mounts[k] = None
        self.mount(k)

    def op_agent_kill(self, _name: str) -> None:
        k = self.rng.randrange(self.nmounts)
        m = self.mount(k)
        self.note(f"agent m{k}: kill -9, mount again")
        m.kill9()
        self.mounts[k] = None
        self.mount(k)
        self.after_agent_crash()

    def after_agent_crash(self) -> None:
        """Every disk reads as its last fsync or as its latest content, byte by byte
        (zeros past both); what is read becomes the model."""
        for name, m in self.models.items():
            got = self.path(name).read_bytes()
            old = self.synced[name]
            lo = min(len(old), len(m))
            if len(got) < lo:
                raise self.fail(f"{name}: {len(got)} bytes after an agent crash; fsynced "
                                f"{len(old)}, latest {len(m)}")
            for b in range(0, len(got), 4096):
                chunk = got[b : b + 4096]
                o = old[b : b + 4096].ljust(len(chunk), b"\0")
                n = bytes(m[b : b + 4096]).ljust(len(chunk), b"\0")
                if chunk in (n, o):
                    continue
                for i, x in enumerate(chunk):
                    if x != o[i] and x != n[i]:
                        raise self.fail(f"{name}: byte {b + i} is {x:#x} after an agent "
                                        f"crash: neither fsynced ({o[i]:#x}) nor latest "
                                        f"({n[i]:#x})")
            if got != m:
                self.note(f"  {name}: unsynced changes partly lost ({len(m)} -> {len(got)} "
                          "bytes); model follows")
            self.models[name] = bytearray(got)
            self.synced[name] = got

    def op_controller_kill(self, _name: str) -> None:
        self.note("controller: kill -9, start again")
        self.ctl.kill9()
        self.ctl.start()

    def op_migrate(self, name: str) -> None:
        on = {e["container"] for e in self.ctl.json("disk", "map", name)["entries"]
              if e["container"] is not None}
        to = "c2" if on == {"c1"} else "c1" if on == {"c2"} else self.rng.choice(["c1", "c2"])
        # half the time in the background: the data operations then run against moves
        wait = self.rng.random() < 0.5
        self.note(f"vdctl disk migrate {name} --to {to}" + ("" if wait else " --no-wait"))
        rc, _out, err = self.ctl.vdctl("disk", "migrate", name, "--to", to,
                                       *([] if wait else ["--no-wait"]), check=False)
        if rc != 0 and "already" not in err:  # wholly there, or a job moves it already
            raise self.fail(f"migrate {name} --to {to}: {err}")

    def op_snap(self, name: str) -> None:
        if len(self.snaps) >= MAX_SNAPS:
            return self.op_snap_rm(name)
        full = snapshot_name(name, self.new_name("s"))
        self.note(f"vdctl snap create {full}")
        self.ctl.vdctl("snap", "create", full)
        self.snaps[full] = bytes(self.models[name])

    def op_snap_read(self, _name: str) -> None:
        if not self.snaps:
            return
        full = self.rng.choice(sorted(self.snaps))
        want = self.snaps[full]
        k = self.rng.randrange(self.nmounts)
        p = self.path(full, k)
        deadline = time.monotonic() + 10  # another mount learns of it within a heartbeat
        while not p.exists():
            if time.monotonic() > deadline:
                raise self.fail(f"{full} does not show in m{k}")
            time.sleep(0.05)
        off = self.rng.randrange(0, max(1, len(want)))
        n = self.rng.randrange(1, MAX_IO)
        self.note(f"read {full} m{k} [{off}, +{n})")
        with open(p, "rb") as f:
            if os.fstat(f.fileno()).st_size != len(want):
                raise self.fail(f"{full}: size {os.fstat(f.fileno()).st_size}, model "
                                f"{len(want)}")
            got = os.pread(f.fileno(), n, off)
        self._check_read(full, off, got, want[off : off + n], f"m{k}")

    def op_clone(self, _name: str) -> None:
        if not self.snaps or len(self.models) >= MAX_DISKS:
            return
        full = self.rng.choice(sorted(self.snaps))
        new = self.new_name("d")
        self.note(f"vdctl disk clone {full} {new}")
        self.ctl.vdctl("disk", "clone", full, new)
        self.models[new] = bytearray(self.snaps[full])
        self.synced[new] = self.snaps[full]

    def op_rollback(self, name: str) -> None:
        mine = sorted(s for s in self.snaps if split_snapshot_name(s)[0] == name)
        if not mine:
            return
        full = self.rng.choice(mine)
        self.note(f"vdctl snap rollback {full}")
        self.ctl.vdctl("snap", "rollback", full)
        self.models[name] = bytearray(self.snaps[full])
        self.synced[name] = self.snaps[full]

    def op_snap_rm(self, _name: str) -> None:
        if not self.snaps:
            return
        full = self.rng.choice(sorted(self.snaps))
        self.note(f"vdctl snap rm {full}")
        rc, _out, err = self.ctl.vdctl("snap", "rm", full, check=False)
        if rc == 0:
            del self.snaps[full]
        elif "has clones" not in err:
            raise self.fail(f"snap rm {full}: {err}")

    # ------------------------------------------------------------ the run
    DATA_OPS = {"write": 30, "read": 30, "truncate": 4, "fsync": 8, "punch": 6, "zero": 6,
                "snap_read": 3}
    IMAGE_OPS = {"resize": 4, "agent_restart": 2, "agent_kill": 2, "controller_kill": 2,
                 "migrate": 4, "snap": 4, "clone": 2, "rollback": 2, "snap_rm": 2}
    IMAGE_RATE = 0.012  # share of operations that are image operations

    def pick(self) -> str:
        table = self.IMAGE_OPS if self.rng.random() < self.IMAGE_RATE else self.DATA_OPS
        return self.rng.choices(list(table), weights=list(table.values()))[0]

    def run(self) -> None:
        """set up, run the ops, verify at the end; always tears down."""
        what = "set-up"
        try:
            self.setup()
            for step in range(1, self.ops + 1):
                self.step = step
                op = self.pick()
                name = self.rng.choice(sorted(self.models))
                self.counts[op] += 1
                what = f"{op} on {name}"
                getattr(self, "op_" + op)(name)
            self.step += 1
            what = "the final check"
            self.finish()
        except TortureFailure as e:
            if e.reported:
                raise
            raise self.fail(f"{what}: {e}") from e
        except (OSError, RuntimeError, subprocess.SubprocessError, ValueError) as e:
            # a failed system call, a mount that did not come up, vdctl that hung...
            raise self.fail(f"{what}: {type(e).__name__}: {e}") from e
        finally:
            self.close()

    def finish(self) -> None:
        """fsync everything, unmount cleanly, mount afresh, compare every byte; check."""
        for name in sorted(self.models):
            self.op_fsync(name)
        for k, m in enumerate(self.mounts):
            if m is not None:
                self.note(f"agent m{k}: unmount")
                rc = m.unmount()
                self.mounts[k] = None
                if rc != 0:
                    raise self.fail(f"agent m{k} exited {rc} at the end:\n{m.log()[-2000:]}")
        self.note("controller: restart")
        self.ctl.stop()
        self.ctl.start()
        for name, want in sorted({**self.models, **self.snaps}.items()):
            self.note(f"compare {name}")
            got = self.path(name, 0).read_bytes()
            self._check_read(name, 0, got, bytes(want), "a fresh mount")
        report = self.ctl.json("check")
        if report["errors"]:
            raise self.fail(f"vdctl check: {report['problems']}")
        self.leaks = report["leaks"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    ap.add_argument("--ops", type=int, default=5000)
    ap.add_argument("--mounts", type=int, choices=(1, 2), default=2)
    ap.add_argument("--dir", type=Path, default=None, help="work dir (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every operation")
    a = ap.parse_args(argv)
    seed = a.seed if a.seed is not None else random.randrange(1 << 32)
    work = Path(tempfile.mkdtemp(prefix="virtfs-torture-", dir=a.dir))
    print(f"torture: seed {seed}, {a.ops} ops, work dir {work}", flush=True)
    t0 = time.monotonic()
    t = Torture(work, seed, a.ops, mounts=a.mounts, verbose=a.verbose)
    try:
        t.run()
    except TortureFailure as e:
        print(e, file=sys.stderr)
        return 1
    print(f"torture: seed {seed} passed: {a.ops} ops in {time.monotonic() - t0:.0f} s "
          f"({dict(sorted(t.counts.items()))}); vdctl check: {t.leaks} leaks", flush=True)
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
