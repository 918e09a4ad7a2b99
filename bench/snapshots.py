"""Snapshots (issue 8): `snap create` time at 1 TiB and 1 GiB, the first write to a shared
segment after a snapshot against a plain write and against copying the whole segment
first, and read throughput of a snapshot file against its disk.

Everything that does I/O is real: a controller process, one ``virtfs-mount`` agent on a
FUSE mount, a file container (a sparse file under ``$TMPDIR``). Three workloads:

``create``: a state dir is built before the controller starts, as bench/controller.py
builds big tables: a container (a sparse file of 1.1 TiB), a 1 TiB thin disk ``big``
with every 4 MiB segment allocated by one ``disk.map`` record each through
``State.apply`` in random order (262,144 extents that do not merge) and a 1 GiB disk
``small`` allocated the same way, written as a checkpoint. The controller
(``virtfs-controller``) starts on it with an agent mounted. The ``snap.create`` RPC is
timed from a client connection held open (no vdctl process start), alternating the two
disks, each snapshot removed again (``snap.rm``, also timed): first with no agent
having the disks open, then with both disk files held open read-write at the agent (a
snapshot then freezes them there: entries pushed ``nowrite``, drained, acknowledged).

``first_write``: a 1 GiB disk (256 MiB with --quick) prefilled with random data
(every segment allocated), one 4 KiB ``O_DIRECT`` write per segment at a random block,
segments in random order: (a) at rest, before the snapshot, on the same disk, then
``snap create d@s`` with the copier held (``VIRTFS_TEST_HOLD_COPIER``: every segment
the writes touch stays shared-but-moving, so each write is a first write to a shared
segment), then (b) the same kind of writes, one per segment. The controller runs in a
child process started by this module (``python -m bench.snapshots --serve-controller``)
that polls the hold file every 0.5 s instead of 0.05 s (hundreds of held copiers
polling 20 times a second would load the controller's event loop), in two variants:
``stock`` (the product's fault path) and ``whole``, with ``_prepare_moving_write``
patched to widen the write to the whole touched segments, so the copy-on-write copies
and marks every block of the segment (4 MiB) before the writer is answered, as LVM
thin, qcow2 or RBD do with a chunk, cluster or object. The child also times the steps
of each write fault (``--profile``). The bench checks what it measured: the snapshot
still reads the pre-snapshot bytes at every written block, and the disk the new ones;
and after the copier is let go, every segment's copy-on-write finishes. With the full
run, one more pair of repetitions uses 16 MiB segments on a 4 GiB disk (256 segments).

``read``: in each ``stock`` repetition above (4 MiB segments), the disk file and the
snapshot file are read sequentially with ``dd bs=1M`` (buffered, through the mount), the
page cache dropped before each (``sync; echo 3 > /proc/sys/vm/drop_caches``): right
after the snapshot, everything shared (disk, snap, snap, disk or the reverse; the first
is the cold read of those bytes: the host's cache of this VM's disk is not dropped), and
three times each once the copies on write have finished, alternating which goes first.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from .movement import BIN, BLOCK, HOLD_ENV, MiB, Rig
from .report import Report, Section, Workload, fmt, less_than
from .report import loadavg as _loadavg
from .report import percentile as _pct
from .report import spread as _spread
from .report import text_table as _table

TITLE = ("snapshots: `snap create` at 1 TiB vs 1 GiB (with and without an agent), first "
         "write to a shared segment vs a plain write vs whole-segment copy, snapshot reads")

GiB = 1 << 30
TiB = 1 << 40
SEG = 4 * MiB
AIM_CREATE_MS = 100.0
AIM_FIRST_WRITE_P99 = 3.0  # p99 of the first write after a snapshot / p99 of a plain write
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- processes (after movement)


def _end(proc: subprocess.Popen[Any], wait: float = 15) -> None:
    """End one process we started (SIGTERM, wait, kill); never raises."""
    if proc.poll() is None:
        try:
            proc.terminate()
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        except OSError:
            pass


def _wait_mounted(path: Path, proc: subprocess.Popen[bytes], log: Path,
                  timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.ismount(path):
        if proc.poll() is not None:
            raise RuntimeError(f"virtfs-mount exited with {proc.returncode}:\n"
                               + log.read_text(errors="replace")[-3000:])
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} not mounted after {timeout:.0f} s:\n"
                               + log.read_text(errors="replace")[-3000:])
        time.sleep(0.02)


@contextmanager
def _rig(tmp: Path, *, child: list[str] | None = None, hold: Path | None = None,
         containers: Sequence[tuple[str, int]] = ()) -> Iterator[Rig]:
    """A controller on tmp/state (which may hold a prebuilt checkpoint): the product's
    virtfs-controller, or this module's patched child with the options in child; the
    containers given (added with vdctl); one agent on tmp/mnt. Everything is stopped
    and unmounted on exit."""
    with ExitStack() as stack:
        state, mnt = tmp / "state", tmp / "mnt"
        state.mkdir(mode=0o700, exist_ok=True)
        mnt.mkdir(exist_ok=True)
        rig = Rig(tmp, state, mnt)
        env = dict(os.environ)
        env.pop(HOLD_ENV, None)
        if hold is not None:
            env[HOLD_ENV] = str(hold)
        if child is None:
            cmd = [str(BIN / "virtfs-controller"), "--state-dir", str(state)]
        else:
            cmd = [sys.executable, "-m", "bench.snapshots", "--serve-controller", str(state),
                   *child]
        clog = tmp / "controller.log"
        rig.logs.append(clog)
        with open(clog, "wb") as f:
            ctl = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f,
                                   stderr=subprocess.STDOUT, env=env, cwd=REPO)
        stack.callback(_end, ctl, 60)
        sock = state / "controller.sock"
        deadline = time.monotonic() + 120
        while True:
            if ctl.poll() is not None:
                raise RuntimeError(f"controller exited {ctl.returncode}:\n"
                                   + clog.read_text(errors="replace")[-3000:])
            if sock.exists():
                try:
                    rig.vdctl("status")
                    break
                except RuntimeError:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError("controller did not answer:\n" + clog.read_text()[-3000:])
            time.sleep(0.1)
        for name, size in containers:
            rig.vdctl("container", "add", name, str(tmp / f"{name}.img"), "--size", str(size))
        alog = tmp / "agent.log"
        rig.logs.append(alog)
        with open(alog, "wb") as f:
            agent = subprocess.Popen(
                [str(BIN / "virtfs-mount"), str(mnt), "--state-dir", str(state),
                 "--controller", f"unix:{sock}"],
                stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp)

        def stop_agent() -> None:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True,
                           check=False)
            try:
                agent.wait(10)  # it ends by itself once unmounted
            except subprocess.TimeoutExpired:
                _end(agent, 10)

        stack.callback(stop_agent)  # runs before the controller's _end
        _wait_mounted(mnt, agent, alog)
        yield rig


def _drop_caches() -> str | None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        return f"could not drop the page cache ({e.strerror}); figures are from a warm cache"
    return None










# ---------------------------------------------------------------- 1. snap create


def _build_state(state_dir: Path, img: Path, csize: int, disks: Sequence[tuple[str, int]],
                 seed: int = 7) -> dict[str, int]:
    """Container c0 (img, sparse, csize) and fully allocated thin disks, every segment
    one disk.map record through State.apply, segments in random order (so that
    neighbouring vstarts are not neighbours on the container and nothing merges);
    written as the state dir's checkpoint. Returns each disk's extent count."""
    from controller.journal import write_checkpoint
    from controller.state import State

    with open(img, "wb") as f:
        f.truncate(csize)
    state = State()
    state.apply({"op": "container.add", "name": "c0", "lun": 1, "path": str(img),
                 "size": csize, "created": True, "seq": 1})
    seq = 1
    rnd = random.Random(seed)
    for name, size in disks:
        seq += 1
        state.apply({"op": "disk.create", "name": name, "size": size, "segment_size": SEG,
                     "thick": False, "pin": None, "home": 1, "ctime": time.time(), "map": [],
                     "seq": seq})
        order = list(range(size // SEG))
        rnd.shuffle(order)
        space = state.luns[1].space
        for s in order:
            seq += 1
            pieces, vs = [], s * SEG
            for off, n in space.plan(SEG):
                pieces.append([vs, n, 1, off])
                vs += n
            state.apply({"op": "disk.map", "name": name, "map": pieces, "seq": seq})
    write_checkpoint(str(state_dir), state)
    out = {}
    for name, size in disks:
        d = state.disks[name]
        if d.allocated != size:
            raise RuntimeError(f"{name}: {d.allocated} bytes allocated, expected {size}")
        out[name] = len(d.extents)
    return out


def _time_creates(sock: Path, names: Sequence[str], reps: int, tag: str, order: list[str]
                  ) -> dict[str, tuple[list[float], list[float]]]:
    """snap.create then snap.rm of NAME@TAGk over one admin connection, the disks
    alternating (order flipped every repetition): ms of each, per disk."""
    import trio

    from controller.client import open_controller

    out: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in names}

    async def go() -> None:
        async with open_controller(f"unix:{sock}") as c:
            for k in range(reps):
                for n in (names if k % 2 == 0 else list(reversed(names))):
                    snap = f"{n}@{tag}{k}"
                    t0 = time.perf_counter()
                    await c.call("snap.create", name=snap)
                    t1 = time.perf_counter()
                    await c.call("snap.rm", name=snap)
                    t2 = time.perf_counter()
                    out[n][0].append((t1 - t0) * 1e3)
                    out[n][1].append((t2 - t1) * 1e3)
                    order.append(n)
                    await trio.sleep(0.05)

    trio.run(go)
    return out


def bench_create(report: Report, section: Section, tmp_root: Path) -> None:
    quick = report.quick
    big = 256 * GiB if quick else TiB
    reps = 5 if quick else 9
    tb = f"{big // GiB} GiB" if big < TiB else f"{big // TiB} TiB"
    w = Workload("create", f"`snap.create` RPC of a {tb} thin disk (every 4 MiB segment "
                 "allocated) and of a 1 GiB disk, without / with an agent having them open",
                 {"repetitions": f"{reps} per disk and condition, alternating"})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="virtfs-bench-snap-create-", dir=tmp_root) as t:
        tmp = Path(t)
        (tmp / "state").mkdir(mode=0o700)
        report.progress(f"snapshots: building a {tb} thin disk ({big // SEG:,} segments) "
                        "and a 1 GiB disk with State.apply")
        tb0 = time.perf_counter()
        ext = _build_state(tmp / "state", tmp / "c0.img", big + big // 10 + 4 * GiB,
                           [("big", big), ("small", GiB)])
        w.add(f"built: {tb} disk extents (segments in random order)", ext["big"], "extents")
        w.add("built: 1 GiB disk extents", ext["small"], "extents")
        w.add("  build time (State.apply + checkpoint)", time.perf_counter() - tb0, "s")
        prof = tmp / "profile.json"
        order: list[str] = []
        with _rig(tmp, child=["--profile", str(prof)]) as rig:
            sock = rig.state / "controller.sock"
            report.progress("snapshots: snap.create, no agent has the disks open")
            closed = _time_creates(sock, ["big", "small"], reps, "c", order)
            report.progress("snapshots: snap.create, the agent has both disks open (rw)")
            fds = [os.open(rig.mnt / n, os.O_RDWR) for n in ("big", "small")]
            try:
                for fd in fds:  # the agent has the table and writes
                    os.pread(fd, BLOCK, 0)
                    os.pwrite(fd, os.urandom(BLOCK), 0)
                opened = _time_creates(sock, ["big", "small"], reps, "o", order)
                # the snapshot shows in the mount, read-only, at the disk's size
                rig.vdctl("snap", "create", "big@shown")
                st = os.stat(rig.mnt / "big@shown")
                if st.st_size != big or st.st_mode & 0o777 != 0o444:
                    raise RuntimeError(f"big@shown: size {st.st_size}, mode "
                                       f"{st.st_mode & 0o777:o}")
                rig.vdctl("snap", "rm", "big@shown")
            finally:
                for fd in fds:
                    os.close(fd)
            rig.vdctl("check")
            slow = [v for res in (closed, opened) for n in res for v in res[n][0] if v > 1000]
            if slow:  # say what the controller and agent logged meanwhile
                for log in rig.logs:
                    lines = [ln for ln in log.read_text(errors="replace").splitlines()
                             if "WARNING" in ln or "ERROR" in ln or "waiting" in ln]
                    for ln in lines[-4:]:
                        w.note(f"{log.name}: {ln[:300]}")
        profile = json.loads(prof.read_text()) if prof.exists() else {}
    # the controller's own time in snap_create and in its freeze push (to the agents,
    # drained, acknowledged), per disk and condition, from the child's profile
    ctl: dict[tuple[str, bool], dict[str, list[float]]] = {}
    for key in ("snap_create", "snap_push"):
        vals = profile.get(key, [])[:len(order)]
        if len(vals) != len(order):
            continue
        for k, (n, v) in enumerate(zip(order, vals, strict=True)):
            ctl.setdefault((n, k >= 2 * reps), {}).setdefault(key, []).append(v / 1e3)
    rows = [["disk", "agent has it open", "create p50", "create min-max", "rm p50",
             "in controller p50", "freeze push p50"]]
    for cond, res in (("no", closed), ("yes (rw)", opened)):
        for n, label in (("big", tb), ("small", "1 GiB")):
            cr, rm = res[n]
            c = ctl.get((n, cond != "no"), {})
            rows.append([label, cond, f"{fmt(statistics.median(cr))} ms",
                         f"{fmt(min(cr))}-{fmt(max(cr))} ms", f"{fmt(statistics.median(rm))} ms",
                         *(f"{fmt(statistics.median(c[k]))} ms" if c.get(k) else "-"
                           for k in ("snap_create", "snap_push"))])
            w.add(f"snap create {label}, {'agent has it open' if cond != 'no' else 'no agent'}"
                  f" (median of {len(cr)}; range {fmt(min(cr))}-{fmt(max(cr))})",
                  round(statistics.median(cr), 2), "ms", less_than(AIM_CREATE_MS))
    for res, cond in ((closed, "no agent"), (opened, "agent has it open")):
        ratio = statistics.median(res["big"][0]) / statistics.median(res["small"][0])
        w.add(f"{tb} / 1 GiB, {cond} (medians)", round(ratio, 2), "x")
    for res, cond in ((closed, "no agent"), (opened, "agent has it open")):
        w.add(f"snap rm {tb} (shares everything), {cond}", _spread(res["big"][1]), "ms")
    w.table = _table(rows, "<<>>>>>")
    for res, cond in ((closed, "no agent"), (opened, "agent has it open")):
        w.note(f"{cond}, create/ms per repetition: " + "; ".join(
            f"{n} " + ", ".join(fmt(v) for v in res[n][0]) for n in res))
    w.note("timed: the snap.create RPC over one open admin connection (Unix socket), "
           "the reply included; each snapshot is removed (snap.rm, timed too) before the "
           "next. The controller is the product's daemon in a child process with timing "
           "wrappers only (in controller: Service.snap_create; freeze push: its "
           "_push_update, which waits for every agent caching the disk to drain and "
           "acknowledge)")
    w.note(f"aim: each < {AIM_CREATE_MS:g} ms, about the same at both sizes; load average "
           f"at the end {_loadavg()}")
    w.seconds = time.perf_counter() - t0
    section.workloads.append(w)
    report.emit(w)


# ---------------------------------------------------------------- 2. first writes


def _timed_writes(path: Path, offsets: list[int], data: bytes) -> list[float]:
    """One 4 KiB O_DIRECT write of data at each offset; each write's latency in µs."""
    buf = mmap.mmap(-1, BLOCK)
    buf.write(data)
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


def _read_blocks(path: Path, offsets: list[int]) -> list[bytes]:
    buf = mmap.mmap(-1, BLOCK)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    out = []
    try:
        for off in offsets:
            n = os.preadv(fd, [buf], off)
            if n != BLOCK:
                raise RuntimeError(f"short read at {off}: {n}")
            out.append(bytes(buf))
    finally:
        os.close(fd)
        buf.close()
    return out


def _prefill(rig: Rig, disk: str, size: int) -> None:
    r = subprocess.run(["fio", "--name=fill", f"--filename={rig.mnt / disk}", "--rw=write",
                        "--bs=1M", f"--size={size}", "--ioengine=psync", "--refill_buffers",
                        "--end_fsync=1", "--fallocate=none", "--output-format=json"],
                       cwd=rig.tmp / "work", capture_output=True, text=True, check=False,
                       timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"prefill failed: {r.stderr[-2000:]}")


def _wait(pred: Any, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)
    return time.monotonic() - t0


def _dd_read(path: Path, size: int) -> float:
    """MiB/s of a sequential 1 MiB buffered read of path (dd), page cache dropped first."""
    _drop_caches()
    t0 = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M", f"count={size // MiB}"],
                   check=True, capture_output=True)
    return size / MiB / (time.perf_counter() - t0)


def _first_writes(tmp_root: Path, variant: str, size: int, seg: int, seed: int,
                  read_reps: int) -> dict[str, Any]:
    nseg = size // seg
    rnd = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix=f"virtfs-bench-snap-fw-{variant}-",
                                     dir=tmp_root) as t, ExitStack() as stack:
        tmp = Path(t)
        (tmp / "work").mkdir()
        hold, prof = tmp / "hold-copier", tmp / "profile.json"
        rig = stack.enter_context(_rig(
            tmp, hold=hold, containers=[("c1", 3 * size)],
            child=["--variant", variant, "--hold-poll", "0.5", "--profile", str(prof)]))
        rig.vdctl("disk", "create", "d", "--size", str(size), "--segment-size", str(seg),
                  "--container", "c1")
        _prefill(rig, "d", size)
        path = rig.mnt / "d"
        segs = list(range(nseg))

        def offsets() -> list[int]:
            rnd.shuffle(segs)
            return [s * seg + rnd.randrange(seg // BLOCK) * BLOCK for s in segs]

        at_rest = _timed_writes(path, offsets(), os.urandom(BLOCK))
        img = tmp / "c1.img"
        offs = offsets()
        before = _read_blocks(path, offs)
        os.sync()
        blocks0 = os.stat(img).st_blocks * 512
        hold.touch()
        rig.vdctl("snap", "create", "d@s")
        reads: dict[str, list[float]] = {"disk": [], "snap": [], "disk_cold": [],
                                         "snap_cold": [], "disk_cow": [], "snap_cow": []}
        if read_reps:  # everything shared (the copier is held: nothing moves meanwhile)
            # each file read once first and once second: the second read of the same
            # blocks may come from the host's cache of this VM's disk, which dropping
            # the guest's page cache does not reach
            order = [("disk", path), ("snap", rig.mnt / "d@s")]
            if (seed // 1000) % 2:
                order.reverse()
            for k, (what, p) in enumerate([*order, *order[::-1]]):
                reads[what + ("_cold" if k == 0 else "")].append(_dd_read(p, size))
            before2 = _read_blocks(path, offs)
            if before2 != before:
                raise RuntimeError("the disk changed while it was read")
        data = os.urandom(BLOCK)
        first = _timed_writes(path, offs, data)
        grown = os.stat(img).st_blocks * 512 - blocks0

        def held() -> int:
            return int(rig.json("snap", "ls", "d")[0]["held"])

        if held() != 0:
            raise RuntimeError("the snapshot holds storage of its own while the copier is "
                               "held: a copy on write finished")
        # the snapshot kept the old bytes, the disk has the new ones
        if _read_blocks(rig.mnt / "d@s", offs) != before:
            raise RuntimeError("the snapshot does not read its pre-snapshot bytes")
        if any(b != data for b in _read_blocks(path, offs)):
            raise RuntimeError("the disk does not read the first writes' bytes")
        hold.unlink()
        done_s = _wait(lambda: held() == size, 600, "the copies on write to finish")
        if _read_blocks(rig.mnt / "d@s", offs) != before:
            raise RuntimeError("the snapshot changed once the copies finished")
        for k in range(read_reps):
            order = [("disk_cow", path), ("snap_cow", rig.mnt / "d@s")]
            for what, p in (order if (k + seed // 1000) % 2 == 0 else order[::-1]):
                reads[what].append(_dd_read(p, size))
        rig.vdctl("check")
        stack.close()  # agent and controller stopped: the profile is written
        profile: dict[str, list[float]] = (json.loads(prof.read_text()) if prof.exists()
                                           else {})
        if len(profile.get("start_move", [])) != nseg:
            raise RuntimeError(f"{len(profile.get('start_move', []))} copies on write were "
                               f"started by the first writes, expected {nseg}")
    return {"at_rest": at_rest, "first": first, "grown": grown, "done_s": done_s,
            "profile": profile, "reads": reads}


def bench_first_writes(report: Report, section: Section, tmp_root: Path) -> None:
    quick = report.quick
    size = 256 * MiB if quick else GiB
    reps = 1 if quick else 3
    configs = [(SEG, size, reps)] + ([] if quick else [(16 * MiB, 4 * GiB, 1)])
    fw_w = Workload("first_write", "first 4 KiB O_DIRECT write to a shared segment right "
                    "after `snap create` (copier held) vs a plain write vs whole-segment copy",
                    {"disk": f"{size // MiB} MiB prefilled, 4 MiB segments, one write per "
                     f"segment ({size // SEG}); repetitions {reps}"
                     + ("" if quick else "; plus 16 MiB segments on a 4 GiB disk, 1 rep")})
    rd_w = Workload("read", "sequential 1 MiB reads (dd, buffered, page cache dropped "
                    "before each): snapshot file vs disk file",
                    {"bytes": f"{size // MiB} MiB"})
    t0 = time.perf_counter()
    res: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for seg, sz, n in configs:
        for rep in range(n):
            for variant in (("stock", "whole") if rep % 2 == 0 else ("whole", "stock")):
                report.progress(f"snapshots: first writes, {seg // MiB} MiB segments, rep "
                                f"{rep + 1}/{n}, {variant}")
                res.setdefault((seg, variant), []).append(_first_writes(
                    tmp_root, variant, sz, seg, 1000 * rep + 11,
                    3 if variant == "stock" and seg == SEG else 0))
    rows = [["segment", "rep", "variant", "plain p50", "plain p99", "first p50", "first p99",
             "p99 ratio", "max", "container grew", "fault (ctl) p50"]]
    for (seg, variant), runs in res.items():
        for k, r in enumerate(runs):
            pr, fw = sorted(r["at_rest"]), sorted(r["first"])
            f = sorted(r["profile"].get("fault", []))
            rows.append([f"{seg // MiB} MiB", str(k + 1), variant, f"{fmt(_pct(pr, 50))} us",
                         f"{fmt(_pct(pr, 99))} us", f"{fmt(_pct(fw, 50))} us",
                         f"{fmt(_pct(fw, 99))} us", f"{_pct(fw, 99) / _pct(pr, 99):.1f}x",
                         f"{fmt(fw[-1])} us", f"{r['grown'] / MiB:.1f} MiB",
                         f"{fmt(_pct(f, 50))} us" if f else "-"])
    fw_w.table = _table(rows, "<><>>>>>>>>")
    for (seg, variant), runs in res.items():
        lab = f"{seg // MiB} MiB segments, {'(a) virtfs' if variant == 'stock' else '(b) whole'}"
        p50 = [_pct(sorted(r["first"]), 50) for r in runs]
        p99 = [_pct(sorted(r["first"]), 99) for r in runs]
        r99 = [_pct(sorted(r["first"]), 99) / _pct(sorted(r["at_rest"]), 99) for r in runs]
        rest50 = [_pct(sorted(r["at_rest"]), 50) for r in runs]
        rest99 = [_pct(sorted(r["at_rest"]), 99) for r in runs]
        fw_w.add(f"{lab}: plain write at rest p50 / p99",
                 f"{_spread(rest50)} / {_spread(rest99)}", "us")
        fw_w.add(f"{lab}: first write p50 / p99", f"{_spread(p50)} / {_spread(p99)}", "us")
        fw_w.add(f"{lab}: first-write p99 / plain p99 (median; range "
                 f"{min(r99):.1f}-{max(r99):.1f})", round(statistics.median(r99), 2), "x",
                 less_than(AIM_FIRST_WRITE_P99) if variant == "stock" else None)
        fw_w.add(f"{lab}: background copy done after the copier was let go",
                 _spread([r["done_s"] for r in runs]), "s")
        steps: dict[str, list[float]] = {}
        for r in runs:
            for step, v in r["profile"].items():
                steps.setdefault(step, []).extend(v)
        if steps.get("fault"):
            fw_w.note(f"{lab}, controller side (median us per write fault): " + ", ".join(
                f"{k} {fmt(statistics.median(v))}" for k, v in steps.items()
                if v and not k.startswith("snap_")))
    for seg in sorted({s for s, _ in res}):
        a, b = res.get((seg, "stock")), res.get((seg, "whole"))
        if a and b:
            fw_w.add(f"{seg // MiB} MiB segments: (b)/(a) first-write p50 (medians)",
                     round(statistics.median(_pct(sorted(r["first"]), 50) for r in b)
                           / statistics.median(_pct(sorted(r["first"]), 50) for r in a), 2),
                     "x")
    fw_w.note("fault steps: fault = the whole disk.fault; start_move = the copy-on-write's "
              "new space (move.start commit + drained push); copy = durable block copies; "
              "journal_wait = commits waited for inside faults; push = pushes to agents")
    fw_w.note("container grew: the container file's allocated bytes (st_blocks) after the "
              "first writes minus before the snapshot, the copier held: the bytes the "
              "first writes copied")
    fw_w.note("checked: the snapshot reads its pre-snapshot bytes at every written block "
              "(held and after the copies finished), the disk the new bytes; vdctl check")
    fw_w.note(f"aim: p99 of (a) <= {AIM_FIRST_WRITE_P99:g}x the plain write's p99; "
              f"load average at the end {_loadavg()}")
    fw_w.seconds = time.perf_counter() - t0
    section.workloads.append(fw_w)
    report.emit(fw_w)

    stock = res.get((SEG, "stock"), [])
    for sfx, when in (("_cold", "shared, first read of the bytes after the drop"),
                      ("", "shared, the bytes read before by the other file or itself"),
                      ("_cow", "after every segment was copied on write")):
        disk = [v for r in stock for v in r["reads"]["disk" + sfx]]
        snap = [v for r in stock for v in r["reads"]["snap" + sfx]]
        rd_w.add(f"{when}: disk file ({len(disk)} reads)", _spread(disk), "MiB/s")
        rd_w.add(f"{when}: snapshot file ({len(snap)} reads)", _spread(snap), "MiB/s")
        if disk and snap:
            rd_w.add("  snapshot / disk (medians)",
                     round(statistics.median(snap) / statistics.median(disk), 3), "x")
    rd_w.note("median (min-max). Read in each (a) repetition of first_write: right after "
              "`snap create` (copier held, before the first writes, everything shared) in the "
              "order disk, snap, snap, disk or the reverse (the first of the four is the "
              "cold read of those bytes); and 3 times each once the "
              "copies on write finished (the disk then maps every segment at its new place, "
              "allocated in the random order of the first writes; the snapshot the original "
              "places, written sequentially by the prefill); the order alternates")
    rd_w.note(_drop_caches() or "the guest's page cache dropped before each read (the "
              "host's cache of this VM's disk is not: a read of blocks just read by the "
              "other file can come from there)")
    section.workloads.append(rd_w)
    report.emit(rd_w)


def run(report: Report, section: Section) -> None:
    tmp_root = Path(os.environ.get("TMPDIR", "/tmp"))
    print(f"snapshots: files under {tmp_root}; load average {_loadavg()}",
          file=report.out, flush=True)
    bench_create(report, section, tmp_root)
    bench_first_writes(report, section, tmp_root)


# ---------------------------------------------------------------- the controller child


def _serve_controller(state_dir: str, variant: str, hold_poll: float | None,
                      profile: str | None) -> int:
    """The product's controller daemon with, optionally: the hold file polled every
    hold_poll s; for variant 'whole' the write fault widened to the whole touched
    segments (a copy-on-write then copies and marks every block of the segment before
    the writer is answered); with profile, each write fault's step times written there
    as JSON at exit."""
    import trio

    import controller.service.movement as movement
    from controller import daemon
    from controller.extents import MOVING
    from controller.journal import Journal
    from controller.service import Service

    if hold_poll is not None:
        async def slow_hold() -> None:
            path = os.environ.get(HOLD_ENV)
            while path and os.path.exists(path):  # noqa: ASYNC110, ASYNC240 - a test hook
                await trio.sleep(hold_poll)

        movement._test_hold = slow_hold  # type: ignore[assignment]
    if variant == "whole":
        orig = Service._prepare_moving_write

        async def whole(self: Any, d: Any, start: int, end: int, exclude: Any) -> bool:
            touched = [e for e in d.extents.stored_in(start, end) if e.flags & MOVING]
            if touched:  # copy and mark every unmarked block of the touched segments
                start = min(e.vstart for e in touched)
                end = max(e.vend for e in touched)
            return bool(await orig(self, d, start, end, exclude))

        Service._prepare_moving_write = whole  # type: ignore[method-assign]
    if profile is None:
        return daemon.main(["--state-dir", state_dir])

    # the tasks answering a write fault (a context variable would be inherited by the
    # copier tasks the fault spawns, and their copies are not the fault's)
    in_fault: set[Any] = set()
    in_snap: set[Any] = set()  # the tasks answering snap.create
    times: dict[str, list[float]] = {"fault": [], "start_move": [], "copy": [],
                                     "journal_wait": [], "push": []}

    def timed(cls: Any, name: str, key: str) -> None:
        orig_m = getattr(cls, name)

        async def wrapper(*a: Any, **kw: Any) -> Any:
            task = trio.lowlevel.current_task()
            k = key if task in in_fault else f"snap_{key}" if task in in_snap else None
            if k is None:
                return await orig_m(*a, **kw)
            t = time.perf_counter()
            try:
                return await orig_m(*a, **kw)
            finally:
                times.setdefault(k, []).append((time.perf_counter() - t) * 1e6)
        setattr(cls, name, wrapper)

    timed(Service, "_start_move", "start_move")
    timed(Service, "_copy", "copy")
    timed(Journal, "wait_durable", "journal_wait")
    timed(Service, "_push_update", "push")
    orig_fault = Service.disk_fault

    async def fault(self: Any, name: str, offset: int, length: int, write: bool,
                    conn: Any) -> Any:
        if not write:
            return await orig_fault(self, name, offset, length, write, conn)
        task = trio.lowlevel.current_task()
        in_fault.add(task)
        t = time.perf_counter()
        try:
            return await orig_fault(self, name, offset, length, write, conn)
        finally:
            times["fault"].append((time.perf_counter() - t) * 1e6)
            in_fault.discard(task)

    Service.disk_fault = fault  # type: ignore[method-assign]
    orig_snap = Service.snap_create

    async def snap_create(self: Any, name: str) -> Any:
        for k, v in times.items():  # only the faults after the snapshot count
            if not k.startswith("snap_"):
                v.clear()
        task = trio.lowlevel.current_task()
        in_snap.add(task)
        t = time.perf_counter()
        try:
            return await orig_snap(self, name)
        finally:
            times.setdefault("snap_create", []).append((time.perf_counter() - t) * 1e6)
            in_snap.discard(task)

    Service.snap_create = snap_create  # type: ignore[method-assign]
    try:
        return daemon.main(["--state-dir", state_dir])
    finally:
        with open(profile, "w") as f:
            json.dump(times, f)


def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.snapshots")
    p.add_argument("--serve-controller", metavar="STATE_DIR", required=True)
    p.add_argument("--variant", choices=["stock", "whole"], default="stock")
    p.add_argument("--hold-poll", type=float, help="hold-file poll interval (product: 0.05 s)")
    p.add_argument("--profile", metavar="FILE", help="write fault step times here at exit")
    args = p.parse_args(argv)
    return _serve_controller(args.serve_controller, args.variant, args.hold_poll,
                             args.profile)


if __name__ == "__main__":
    sys.exit(_main())
