"""The one rig of tests/ and bench/: real processes and real client tools.

A controller process (``ControllerProc``), an agent on a FUSE mount (``MountProc``), the
two together with containers (``open_rig``), vdctl (in-process for tests, a process for
timings), fio and other client tools run from a temp dir, ``O_DIRECT`` I/O from aligned
buffers, timed writes, loop devices and page-cache drops.

Tests import it as ``rig`` (``tests/`` is on pytest's ``pythonpath``); the bench, run as
``python -m bench.run`` from the repository root, as ``tests.rig``. So this module
imports nothing from ``tests/``: only the standard library and the product.

Every process it starts is stopped by its owner: a mount is always lazily unmounted
(``fusermount3 -u -z``) before its agent is waited for, then terminated, then killed.
"""

from __future__ import annotations

import contextlib
import io
import json
import mmap
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller import cli, faultpoints
from controller.protocol import BLOCK_SIZE as BLOCK

BIN = Path(sys.executable).parent
SEG = 4 << 20  # the default segment size of a thin disk

# Log files of the controllers and agents started here: the tests' check_logs fixture
# (conftest.py) fails a test whose processes logged a traceback it did not declare.
PROC_LOGS: list[Path] = []


# ---------------------------------------------------------------- small helpers


def wait_for(pred: Callable[[], object], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.02) -> None:
    """Poll pred every interval s until it is true; TimeoutError after timeout s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


def end_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM,
                wait: float = 15) -> None:
    """End one process we started: sig, wait up to wait s, then SIGKILL; never raises."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        except OSError:
            pass


def fusermount_u(path: Path) -> None:
    """Lazy unmount (fusermount3 -u -z); a path that is not mounted is no error."""
    subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, check=False)


def wait_mounted(path: Path, proc: subprocess.Popen[bytes], log: Path, what: str,
                 timeout: float = 30) -> None:
    """Wait until path is a mount point, served by proc (whose output goes to log).

    Raises RuntimeError if proc exits first, TimeoutError after timeout s; both carry
    the log's tail.
    """
    deadline = time.monotonic() + timeout
    while not os.path.ismount(path):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n"
                               + log.read_text(errors="replace")[-3000:])
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: {path} not mounted after {timeout:.0f} s:\n"
                               + log.read_text(errors="replace")[-3000:])
        time.sleep(0.02)


def stop_mount_daemon(proc: subprocess.Popen[bytes], mountpoint: Path) -> None:
    """Lazy-unmount, then wait for (terminate, kill if need be) the FUSE daemon serving
    mountpoint (virtfs-mount, qemu-storage-daemon); never raises."""
    fusermount_u(mountpoint)
    if proc.poll() is None:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            end_process(proc, wait=10)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drop_caches() -> str | None:
    """sync, then drop the page cache; the reason it could not (not root), or None."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        return f"could not drop the page cache ({e.strerror}); figures are from a warm cache"
    return None


# ---------------------------------------------------------------- fault points

FAULTS_ENV = faultpoints.ENV  # VIRTFS_FAULTS: what a controller or agent arms at start


def hold_copier(hold: Path) -> str:
    """The fault-point spec that holds the controller's copier while the file hold
    exists (``movement.copier=hold:FILE``, every hit): moves stay half done, so writes
    and reads meet a bitmap the test controls. Arm it through FAULTS_ENV, or with
    faultpoints.arm for an in-process controller."""
    return f"movement.copier=hold:{hold}@1+"


# ---------------------------------------------------------------- vdctl


@dataclass
class Result:
    """What vdctl printed: its exit code, stdout and stderr."""

    rc: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def run_vdctl(*args: str) -> Result:
    """vdctl in this process (``cli.main``), its output captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = cli.main(list(args), out=out)
    return Result(rc, out.getvalue(), err.getvalue())


# ---------------------------------------------------------------- the controller


class ControllerProc:
    """A virtfs-controller subprocess for one state dir, its output in log_path.

    ``start()``/``stop()`` for tests (ready once ``vdctl status`` answers); as a
    context manager for the bench (ready once its socket accepts a connection, the
    time to that in ``ready_seconds``; a clean stop may take up to 120 s at scale).
    """

    def __init__(self, state_dir: Path, log_path: Path, *, env: dict[str, str] | None = None,
                 cwd: Path | None = None):
        self.state_dir = state_dir
        self.log_path = log_path
        PROC_LOGS.append(log_path)
        self.sock = state_dir / "controller.sock"
        self.addr = f"unix:{self.sock}"
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_seconds = 0.0
        self._started = 0.0

    def start(self, extra: list[str] | None = None, wait: bool = True) -> None:
        """Start it (extra: more virtfs-controller arguments); with wait, until ready."""
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        self._started = time.perf_counter()
        self.proc = subprocess.Popen(
            [str(BIN / "virtfs-controller"), "--state-dir", str(self.state_dir), *(extra or [])],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            env=self.env, cwd=self.cwd,
        )
        if wait:
            self.wait_ready()

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"controller exited {self.proc.returncode}: "
                               f"{self.log_path.read_text(errors='replace')[-2000:]}")

    def wait_ready(self, timeout: float = 15) -> None:
        """Until ``vdctl status`` succeeds; RuntimeError if the controller exits."""
        def ready() -> bool:
            self._check_alive()
            return self.vdctl("status").rc == 0 if self.sock.exists() else False
        wait_for(ready, timeout, "controller socket")

    def wait_listening(self, timeout: float = 120) -> float:
        """Until its socket accepts a connection; the seconds since start()."""
        def listening() -> bool:
            self._check_alive()
            if not self.sock.exists():
                return False
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(str(self.sock))
                except OSError:
                    return False
            return True
        wait_for(listening, timeout, "the controller to listen", interval=0.01)
        return time.perf_counter() - self._started

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM, wait up to timeout s (then SIGKILL); its exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        self.log.close()
        return rc

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None
        self.log.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def vdctl(self, *args: str) -> Result:
        """vdctl on this controller's state dir, in this process."""
        return run_vdctl("--state-dir", str(self.state_dir), *args)

    def __enter__(self) -> ControllerProc:
        self.start(wait=False)
        try:
            self.ready_seconds = self.wait_listening()
        except BaseException:
            self.stop(120)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(120)


# ---------------------------------------------------------------- agents (mounts)


class MountProc:
    """One agent (virtfs-mount) on its own mountpoint; start() returns once mounted."""

    def __init__(self, mnt: Path, state_dir: Path, log_path: Path, *,
                 controller: str | None = None, args: list[str] | None = None,
                 env: dict[str, str] | None = None, prefix: list[str] | None = None,
                 timeout: float = 30):
        self.path = mnt
        self.state_dir = state_dir
        self.log_path = log_path
        PROC_LOGS.append(log_path)
        self.controller = controller
        self.args = args or []
        self.env = env or {}
        self.prefix = prefix or []  # e.g. strace fault injection; .pid is then the prefix's
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> MountProc:
        self.path.mkdir(parents=True, exist_ok=True)
        cmd = [*self.prefix, str(BIN / "virtfs-mount"), str(self.path),
               "--state-dir", str(self.state_dir), *self.args]
        if self.controller:
            cmd += ["--controller", self.controller]
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        log.close()
        deadline = time.monotonic() + self.timeout
        while not os.path.ismount(self.path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"virtfs-mount exited {self.proc.returncode}:\n"
                                   f"{self.log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.path} not mounted:\n{self.log_path.read_text()}")
            time.sleep(0.02)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def unmount(self, timeout: float = 30) -> int:
        """A clean unmount (fusermount3 -u); returns the agent's exit code."""
        assert self.proc is not None
        subprocess.run(["fusermount3", "-u", str(self.path)], check=True, capture_output=True)
        rc = self.proc.wait(timeout)
        self.proc = None
        return rc

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None
        fusermount_u(self.path)

    def close(self) -> None:
        """Teardown: never leaves a mount behind."""
        fusermount_u(self.path)
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


# ---------------------------------------------------------------- a controller with agents


def vd(c: ControllerProc, *args: str) -> Result:
    """vdctl on c that must succeed."""
    r = c.vdctl(*args)
    assert r.rc == 0, f"vdctl {' '.join(args)}: {r.err}"
    return r


def add_container(c: ControllerProc, name: str, path: Path, size: str = "2G") -> None:
    vd(c, "container", "add", name, str(path), "--size", size)


def agent(mount_factory: Any, c: ControllerProc, name: str = "m", **kw: Any) -> Any:
    """An agent (virtfs-mount) of the standalone controller c, from the tests'
    mount_factory fixture."""
    return mount_factory(name, state_dir=c.state_dir, controller="unix:" + str(c.sock), **kw)


def disk_info(c: ControllerProc, name: str) -> dict[str, Any]:
    return vd(c, "disk", "info", name, "--format", "json").json()  # type: ignore[no-any-return]


def check_clean(c: ControllerProc) -> None:
    r = c.vdctl("check")
    assert r.rc == 0 and "clean" in r.out, r.out + r.err


@dataclass
class Rig:
    """A controller, its containers and one agent in tmp (``open_rig``); vdctl here runs
    as a process, as a user would run it (the bench times some of its commands)."""

    tmp: Path
    state: Path
    mnt: Path
    controller: ControllerProc
    logs: list[Path] = field(default_factory=list)

    def vdctl(self, *args: str, timeout: float = 900) -> str:
        """vdctl ARGS as a process; its stdout. RuntimeError (with the logs' tails) on
        failure."""
        r = subprocess.run([str(BIN / "vdctl"), "--state-dir", str(self.state), *args],
                           capture_output=True, text=True, timeout=timeout, check=False)
        if r.returncode != 0:
            tail = "".join(p.read_text(errors="replace")[-1500:] for p in self.logs)
            raise RuntimeError(f"vdctl {' '.join(args)} failed ({r.returncode}): "
                               f"{r.stderr.strip()}\n{tail}")
        return r.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.vdctl(*args, "--format", "json"))

    def entries(self, disk: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.json("disk", "map", disk)["entries"]
        return rows

    def job(self, jid: int) -> dict[str, Any]:
        for j in self.json("job", "ls"):
            if j["id"] == jid:
                return dict(j)
        raise RuntimeError(f"job {jid} is not listed")

    def last_job(self) -> dict[str, Any]:
        rows = self.json("job", "ls")
        return dict(max(rows, key=lambda j: j["id"]))


@contextmanager
def open_rig(tmp: Path, containers: Sequence[tuple[str, int]] = (), *,
             env: dict[str, str] | None = None, mount_timeout: float = 60,
             ctl_args: Sequence[str] = ()) -> Iterator[Rig]:
    """A virtfs-controller on tmp/state (which may hold a prebuilt state), the containers
    given as (name, size in bytes) added as sparse files tmp/NAME.img, one agent mounted
    on tmp/mnt. env: the processes' environment (default: this one's); ctl_args: more
    virtfs-controller arguments. Everything is unmounted and stopped on exit, the agent
    first."""
    with ExitStack() as stack:
        state, mnt = tmp / "state", tmp / "mnt"
        state.mkdir(mode=0o700, exist_ok=True)
        mnt.mkdir(exist_ok=True)
        ctl = ControllerProc(state, tmp / "controller.log", env=env, cwd=tmp)
        rig = Rig(tmp, state, mnt, ctl, [ctl.log_path])
        ctl.start(list(ctl_args), wait=False)
        stack.callback(ctl.stop, 120)
        ctl.wait_listening(120)
        wait_for(lambda: ctl.vdctl("status").rc == 0, 30, "the controller to answer", 0.1)
        for name, size in containers:
            rig.vdctl("container", "add", name, str(tmp / f"{name}.img"), "--size", str(size))
        m = MountProc(mnt, state, tmp / "agent.log", controller=ctl.addr,
                      env=env, timeout=mount_timeout)
        rig.logs.append(m.log_path)
        stack.callback(m.close)  # runs before the controller's stop
        m.start()
        yield rig


# ---------------------------------------------------------------- client tools


def run(cmd: list[str], *, cwd: str | Path | None = None, check: bool = True,
        timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """A command, its output captured; with check, AssertionError (with the output's
    tail) on a non-zero exit."""
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-3000:]}")
    return p


def fio(filename: Path, *args: str, check: bool = True, cwd: Path | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """fio in a temp dir (it drops *-verify.state files in the current directory)."""
    with tempfile.TemporaryDirectory() as tmp:
        return run(["fio", "--name=v", f"--filename={filename}", *args],
                   cwd=cwd or tmp, check=check, timeout=timeout)


FIO_VERIFY = ["--bs=4k", "--rw=randwrite", "--ioengine=psync", "--verify=crc32c",
              "--verify_fatal=1", "--fallocate=none", "--randrepeat=1"]


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics_port(log: Path, who: str = "") -> int:
    """The port a daemon started with --metrics HOST:0 serves on, from its log line
    "WHO: metrics at http://HOST:PORT/metrics" (who: virtfs-mount, virtfs-controller;
    empty: either); waits up to 15 s for it."""
    found: list[int] = []

    def seen() -> bool:
        m = re.search(rf"{who}: metrics at http://[^:]+:(\d+)/metrics", log.read_text())
        if m:
            found.append(int(m.group(1)))
        return bool(m)
    wait_for(seen, 15, f"{who or 'the daemon'}'s metrics address")
    return found[0]


def scrape(port: int) -> Samples:
    """Every sample on 127.0.0.1:port/metrics (a real HTTP GET, parsed by
    prometheus-client): {(name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def sample(samples: Samples, name: str, **labels: str) -> float:
    """One sample of a scrape (0 when absent: a counter not yet incremented)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def agent_killed_under_fio(m: Any, job: list[str], tmp_path: Path, after: float) -> Path:
    """Run fio job (a command: fio --name=... --filename=... in m, fixed --randseed)
    writing with an fsync after each write and saving its verify state, kill -9 the agent
    m after `after` seconds (fio must still run then), and wait for fio. Returns fio's
    work dir, holding the verify state for a later `--verify_only --verify_state_load=1`
    run of the same job (through a new agent: replace m's path in it)."""
    work = tmp_path / "fio"
    work.mkdir()
    with open(tmp_path / "fio-write.log", "wb") as log:
        p = subprocess.Popen([*job, "--do_verify=0", "--fsync=1", "--verify_state_save=1"],
                             cwd=work, stdout=log, stderr=subprocess.STDOUT)
    try:
        time.sleep(after)
        assert p.poll() is None, "fio finished before the crash"
        m.kill9()
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return work


def prefill(path: Path, size: int, cwd: Path, timeout: float = 900) -> None:
    """Write size bytes of random data to path in 1 MiB writes, then fsync (on a thin
    disk: every segment allocated); fio runs in cwd."""
    r = subprocess.run(["fio", "--name=fill", f"--filename={path}", "--rw=write",
                        "--bs=1M", f"--size={size}", "--ioengine=psync", "--refill_buffers",
                        "--end_fsync=1", "--fallocate=none", "--output-format=json"],
                       cwd=cwd, capture_output=True, text=True, check=False, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"prefill failed: {r.stderr[-2000:]}")


@contextmanager
def loop_device(path: Path, *args: str) -> Iterator[str]:
    """A loop device over path (losetup -f --show ARGS); always detached on exit (loop
    devices are global: a failed detach is an error)."""
    dev = run(["losetup", "-f", "--show", *args, str(path)]).stdout.strip()
    try:
        yield dev
    finally:
        run(["losetup", "-d", dev])


# ---------------------------------------------------------------- O_DIRECT I/O


def open_direct(path: Path, write: bool = True) -> int:
    return os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_DIRECT)


def dwrite(fd: int, offset: int, data: bytes) -> None:
    """One O_DIRECT pwrite from a page-aligned buffer (offset and size 4096-aligned)."""
    assert offset % BLOCK == 0 and len(data) % BLOCK == 0
    with mmap.mmap(-1, len(data)) as buf:
        buf[:] = data
        n = os.pwrite(fd, buf, offset)
    assert n == len(data), f"short O_DIRECT write: {n} of {len(data)}"


def dread(fd: int, offset: int, length: int) -> bytes:
    """One O_DIRECT pread into a page-aligned buffer."""
    assert offset % BLOCK == 0 and length % BLOCK == 0
    with mmap.mmap(-1, length) as buf:
        n = os.preadv(fd, [buf], offset)
        return bytes(buf[:n])


def read_direct(path: Path, offset: int, length: int) -> bytes:
    fd = open_direct(path, write=False)
    try:
        return dread(fd, offset, length)
    finally:
        os.close(fd)


def timed_writes(path: Path, offsets: Sequence[int], data: bytes | None = None) -> list[float]:
    """One 4 KiB O_DIRECT write at each offset (data, or random bytes); each write's
    latency in µs. RuntimeError on a short write."""
    buf = mmap.mmap(-1, BLOCK)
    buf.write(data if data is not None else os.urandom(BLOCK))
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    out = []
    try:
        for off in offsets:
            t0 = time.perf_counter_ns()
            n = os.pwrite(fd, buf, off)
            out.append((time.perf_counter_ns() - t0) / 1e3)
            if n != BLOCK:
                raise RuntimeError(f"short write at {off}: {n}")
    finally:
        os.close(fd)
        buf.close()
    return out


class FsyncWriter:
    """Random 4 KiB O_DIRECT writes to path at blocks (4 KiB block numbers), each
    followed by fsync, in a thread (``thread.start()``, ``stop.set()``): durable
    (block -> the bytes its last fsync that returned 0 covered) and maybe (block -> the
    writes after that, whose fsync failed or had not returned). Stops at the first
    error (a failed fsync fails every later one at this agent)."""

    def __init__(self, path: Path, blocks: list[int], trust_writes: bool = False):
        self.path, self.blocks = path, blocks
        self.trust_writes = trust_writes  # the broken oracle: a write counts as durable
        self.durable: dict[int, bytes] = {}
        self.maybe: dict[int, list[bytes]] = {}
        self.errors: list[OSError] = []
        self.writes = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        fd = open_direct(self.path)
        rnd = random.Random(7)
        try:
            while not self.stop.is_set():
                b = rnd.choice(self.blocks)
                data = rnd.randbytes(BLOCK)
                self.maybe.setdefault(b, []).append(data)
                try:
                    dwrite(fd, b * BLOCK, data)
                    if self.trust_writes:
                        self._durable(b, data)
                    os.fsync(fd)
                except OSError as e:
                    self.errors.append(e)
                    return
                self._durable(b, data)
                self.writes += 1
        finally:
            os.close(fd)

    def _durable(self, b: int, data: bytes) -> None:
        self.durable[b] = data
        self.maybe.pop(b, None)

    def check(self, path: Path, base: bytes) -> None:
        """Every block reads as its last durable bytes (the base if none) or one of the
        writes after them; AssertionError naming the first that does not."""
        for b in sorted({*self.durable, *self.maybe}):
            got = read_direct(path, b * BLOCK, BLOCK)
            ok = [self.durable.get(b, base[b * BLOCK : (b + 1) * BLOCK]),
                  *self.maybe.get(b, [])]
            assert got in ok, f"block {b}: lost an fsynced write (or read older bytes)"
