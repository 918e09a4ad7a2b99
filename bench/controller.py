"""Controller workloads: journal group commit, replay, table size, and scale.

- ``commit``: a real ``virtfs-controller`` process on a temp state dir, N client
  connections (each ``open_controller``) doing small metadata changes; every
  reply is sent only after the record is fsynced, so ops/s here are
  acknowledged durable ops. fsyncs/op comes from the controller's own
  ``commits`` counter (``status``).
- ``replay``: a journal of 1,000,000 realistic records (thin segment
  allocations, resizes, thick create/rm pairs) built through ``State.apply``
  on a shadow state, then ``recover()`` timed in a fresh process; the
  replayed state must equal the shadow, byte for byte.
- ``table``: a 1 TiB thick disk (extent count, ``disk map``), and a 1 TiB thin
  disk fully allocated in random segment order (no merging: the worst case):
  memory, build time, checkpoint size, and a full ``disk map``.
- ``scale``: a pool of thin 1 TiB disks (100 TiB, 26 million extents; 10 TiB
  with --quick, or ``VIRTFS_BENCH_SCALE_TIB``), every 4 MiB segment allocated
  in random order through ``State.apply``: memory, a checkpoint taken under
  load (the loop's longest stall, faults answered meanwhile), a full journal
  after it (``CHECKPOINT_BYTES``: the most a restart replays), and the restart
  (``recover()`` and a real ``virtfs-controller``).

Measurements that depend on a process's memory run in a child process
(``python -m bench.controller child ...``) so earlier workloads do not skew them.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import tracemalloc
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import trio

from controller import codec, frames
from controller.checkpoint import Snapshot, checkpoint_frames, load_checkpoint, write_checkpoint
from controller.client import Client, open_controller
from controller.journal import CHECKPOINT_BYTES, Journal
from controller.protocol import DEFAULT_SEGMENT_SIZE
from controller.records import (
    ContainerAdd,
    DiskCreate,
    DiskMap,
    DiskResize,
    DiskRm,
    DiskUnmap,
    Piece,
    Record,
)
from controller.recovery import JOURNAL, recover
from controller.service import Service
from controller.state import State
from tests.rig import ControllerProc, cpu_seconds

from .report import Report, Section, Workload, less_than, more_than

TITLE = "controller: journal group commit, replay, table size"

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


# ---------------------------------------------------------------- process helpers


def _proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM etc. from /proc/PID/status, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key.startswith("Vm") and rest.strip().endswith("kB"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _rss(pid: int | str = "self") -> int:
    return _proc_status(pid)["VmRSS"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@contextmanager
def _tempdir(tag: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=f"virtfs-bench-{tag}-") as d:
        yield Path(d)


def controller_proc(state_dir: Path) -> ControllerProc:
    """A virtfs-controller on state_dir (the rig's), its log next to it, as a context
    manager: started and listening on entry (``ready_seconds``), stopped cleanly on exit."""
    return ControllerProc(state_dir, state_dir.parent / f"{state_dir.name}.log", env=_env(),
                          cwd=REPO)


def _run_child(*args: str) -> dict[str, Any]:
    """Run ``python -m bench.controller child ARGS`` and return the JSON it prints."""
    r = subprocess.run([sys.executable, "-m", "bench.controller", "child", *args],
                       cwd=REPO, env=_env(), capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"bench child {args[0]} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return cast(dict[str, Any], json.loads(r.stdout.strip().splitlines()[-1]))


def _fdatasync_latency(directory: Path, n: int = 200) -> float:
    """Seconds per append + fdatasync of a small record: the floor under one commit."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(10):
            os.write(fd, b"x" * 128)
            os.fdatasync(fd)
        t0 = time.perf_counter()
        for _ in range(n):
            os.write(fd, b"x" * 128)
            os.fdatasync(fd)
        return (time.perf_counter() - t0) / n
    finally:
        os.close(fd)
        path.unlink()


def _pct(sorted_vals: list[float], p: float) -> float:
    if not sorted_vals:
        return float("nan")
    return sorted_vals[min(len(sorted_vals) - 1, int(p / 100 * len(sorted_vals)))]


# ---------------------------------------------------------------- 1. group commit


async def _commit_level(addr: str, nclients: int, seconds: float, mix: str,
                        tag: str) -> dict[str, Any]:
    """nclients connections doing mix for seconds; ops, latencies, status before/after."""
    lat: list[float] = []
    ops = 0
    go = trio.Event()
    ready = 0
    all_ready = trio.Event()
    t_end = 0.0

    async def worker(i: int) -> None:
        nonlocal ops, ready
        async with open_controller(addr, name=f"bench-{i}") as c:
            mine = f"{tag}-{i}"
            if mix == "resize":
                await c.call("disk.create", name=mine, size=MiB)
            ready += 1
            if ready == nclients:
                all_ready.set()
            await go.wait()
            k = 0
            now = time.perf_counter
            while True:
                if mix == "resize":
                    t0 = now()
                    await c.call("disk.resize", name=mine, size=(2 - k % 2) * MiB,
                                 allow_shrink=True)
                    t1 = now()
                    lat.append(t1 - t0)
                    ops += 1
                else:
                    name = f"{mine}-{k}"
                    t0 = now()
                    await c.call("disk.create", name=name, size=MiB)
                    t1 = now()
                    await c.call("disk.rm", name=name)
                    t2 = now()
                    lat.append(t1 - t0)
                    lat.append(t2 - t1)
                    ops += 2
                    t1 = t2
                k += 1
                if t1 >= t_end:
                    break

    async with open_controller(addr, name="bench-status") as admin:
        async with trio.open_nursery() as nursery:
            for i in range(nclients):
                nursery.start_soon(worker, i)
            await all_ready.wait()
            s0 = await admin.call("status")
            cpu_bench0 = time.process_time()
            t0 = time.perf_counter()
            t_end = t0 + seconds
            go.set()
        elapsed = time.perf_counter() - t0
        cpu_bench = time.process_time() - cpu_bench0
        s1 = await admin.call("status")
        if mix == "resize":
            for i in range(nclients):
                await admin.call("disk.rm", name=f"{tag}-{i}")
    lat.sort()
    return {"ops": ops, "elapsed": elapsed, "lat": lat, "cpu_bench": cpu_bench,
            "commits": s1["commits"] - s0["commits"],
            "checkpoints": s1["checkpoints"] - s0["checkpoints"]}


def bench_commit(report: Report, section: Section) -> None:
    quick = report.quick
    seconds = 1.0 if quick else 3.0
    levels = [(1, "create+rm"), (16, "create+rm"), (64, "create+rm"), (64, "resize")]
    w = Workload("commit", "journal group commit: acknowledged (fsynced) metadata ops over RPC",
                 {"controller": "virtfs-controller subprocess",
                  "clients": "connections from the bench process",
                  "seconds_per_level": seconds})
    t_w = time.perf_counter()
    with _tempdir("commit") as tmp:
        floor = _fdatasync_latency(tmp)
        state_dir = tmp / "state"
        with controller_proc(state_dir) as ctl:

            async def setup() -> None:
                async with open_controller(ctl.addr) as c:
                    await c.call("container.add", name="c0", path=str(tmp / "c0.img"),
                                 size=64 * GiB)

            trio.run(setup)
            w.add("raw append+fdatasync latency (this fs)", floor * 1e6, "us")
            w.add("  = max ops/s at one fsync per op", 1 / floor, "ops/s")
            single = 0.0
            for n, mix in levels:
                report.progress(f"commit: {n} clients, {mix}, {seconds:.0f} s")
                cpu0 = cpu_seconds(ctl.pid)
                r = trio.run(_commit_level, ctl.addr, n, seconds, mix, f"b{n}{mix[0]}")
                cpu_ctl = cpu_seconds(ctl.pid) - cpu0
                ops, el = r["ops"], r["elapsed"]
                rate = ops / el
                if n == 1:
                    single = rate
                label = f"{n} client{'s' if n > 1 else ''}, {mix}"
                w.add(f"{label}: acked ops/s", rate, "ops/s", more_than(5000))
                w.add(f"{label}: fsyncs per op", r["commits"] / ops, "fsync/op")
                w.add(f"{label}: latency p50 / p99",
                      f"{_pct(r['lat'], 50) * 1e3:.2f} / {_pct(r['lat'], 99) * 1e3:.2f}", "ms")
                w.add(f"{label}: controller CPU per op", cpu_ctl / ops * 1e6, "us")
                w.add(f"{label}: controller / bench CPU busy",
                      f"{cpu_ctl / el * 100:.0f}% / {r['cpu_bench'] / el * 100:.0f}%",
                      "of a core")
                if n > 1 and single:
                    w.add(f"{label}: speed-up over 1 client", rate / single, "x")
                if r["checkpoints"]:
                    w.note(f"{label}: {r['checkpoints']} checkpoint(s) during the run")
    w.note("each op is one journal record; its reply is sent after the batch holding it "
           "is written and fdatasync'ed. create+rm = disk.create (1 MiB thin) then disk.rm; "
           "resize = disk.resize 1 MiB <-> 2 MiB on the client's own thin disk")
    w.seconds = time.perf_counter() - t_w
    section.workloads.append(w)
    report.emit(w)


# ---------------------------------------------------------------- 2. replay


class _JournalWriter:
    """Applies records to a shadow State and appends them as journal frames."""

    def __init__(self, path: Path):
        self.state = State()
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.buf: list[bytes] = []
        self.records = 0

    def emit(self, rec: Record) -> None:
        seq = self.state.seq + 1
        self.state.apply(rec, seq)
        self.buf.append(frames.encode({**rec.to_wire(), "seq": seq}))
        self.records += 1
        if len(self.buf) >= 8192:
            self.flush()

    def flush(self) -> None:
        self.f.write(b"".join(self.buf))
        self.buf.clear()

    def close(self) -> None:
        self.flush()
        self.f.close()


def _plan(state: State, length: int, vstart: int, lun: int = 1) -> list[Piece]:
    """Place length bytes on lun the way the service does (next fit from the cursor)."""
    out = []
    for off, n in state.luns[lun].space.plan(length):
        out.append((vstart, n, lun, off))
        vstart += n
    return out


REPLAY_MIXES = {
    "resize": "disk.resize (+1 MiB) of 64 thin disks",
    "mixed": "disk.map of one 4 MiB segment / disk.resize / thick disk.create / disk.rm, "
             "1:1:1:1",
}


def build_replay_journal(path: Path, nrecords: int, mix: str, seed: int = 1) -> State:
    """A journal of nrecords realistic records; returns the live (shadow) state.

    Both mixes start with two containers and 64 thin 16 GiB disks. ``resize``
    then grows random disks by 1 MiB. ``mixed`` cycles through a thin segment
    allocation (disk.map of one 4 MiB segment, random disk and segment, placed
    next-fit as the service does), a resize, and a 16 MiB thick disk.create +
    disk.rm pinned to the second container (so the first one's free space
    stays one range: this measures replay, not a fragmented allocator).
    """
    rnd = random.Random(seed)
    seg = DEFAULT_SEGMENT_SIZE
    ndisks, disk_size = 64, 16 * GiB
    j = _JournalWriter(path)
    j.emit(ContainerAdd("c0", 1, str(path.parent / "c0.img"), 2 * TiB, True))
    j.emit(ContainerAdd("scratch", 2, str(path.parent / "scratch.img"), 64 * GiB, True))
    for i in range(ndisks):
        j.emit(DiskCreate(f"vm{i:02}", disk_size, seg, False, None, 1, 1.7e9 + i, []))
    segs = [(d, s) for d in range(ndisks) for s in range(disk_size // seg)]
    rnd.shuffle(segs)
    k = 0
    while j.records < nrecords:
        phase = 1 if mix == "resize" else k % 4
        if phase == 0:
            d, s = segs.pop()
            j.emit(DiskMap(f"vm{d:02}", _plan(j.state, seg, s * seg)))
        elif phase == 1:
            name = f"vm{rnd.randrange(ndisks):02}"
            j.emit(DiskResize(name, j.state.disks[name].size + MiB, []))
        elif phase == 2:
            j.emit(DiskCreate(f"tmp{k}", 16 * MiB, seg, True, 2, 2, 1.7e9 + k,
                              _plan(j.state, 16 * MiB, 0, lun=2)))
        else:
            j.emit(DiskRm(f"tmp{k - 1}"))
        k += 1
    j.close()
    return j.state


def _state_digest(state: State) -> str:
    """sha256 of the state's checkpoint parts: streamed, so it works at any size, and
    independent of how the extent maps happen to be chunked in memory."""
    h = hashlib.sha256()
    snap = Snapshot(state)
    try:
        for part in snap.parts():
            h.update(codec.pack(part))
    finally:
        snap.release()
    return h.hexdigest()


def _encode_checkpoint(state: State) -> int:
    """Encode the checkpoint of state (snapshot, parts, frames) without writing it."""
    snap = Snapshot(state)
    try:
        return sum(len(f) for f in checkpoint_frames(snap))
    finally:
        snap.release()


def _child_replay(state_dir: str) -> dict[str, Any]:
    rss0 = _rss()
    c0 = time.process_time()
    t0 = time.perf_counter()
    rec = recover(state_dir, repair=False)
    t_recover = time.perf_counter() - t0
    cpu_recover = time.process_time() - c0
    hwm = _proc_status()["VmHWM"]
    rss1 = _rss()
    # the share of frame decoding (CRC + msgpack), measured alone; the rest is State.apply
    with open(os.path.join(state_dir, JOURNAL), "rb") as f:
        data = f.read()
    parse = frames.parse
    t0 = time.perf_counter()
    pos = 0
    while (fr := parse(data, pos)) is not None:
        pos = fr[1]
    t_decode = time.perf_counter() - t0
    del data
    digest = _state_digest(rec.state)
    # the checkpoint the controller would write for this state, and loading it back
    t0 = time.perf_counter()
    ck_bytes = _encode_checkpoint(rec.state)
    t_encode = time.perf_counter() - t0
    ckdir = os.path.join(state_dir, "ck")
    os.mkdir(ckdir)
    t0 = time.perf_counter()
    write_checkpoint(ckdir, rec.state)
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded = load_checkpoint(ckdir)
    t_load = time.perf_counter() - t0
    return {"recover_s": t_recover, "recover_cpu_s": cpu_recover, "decode_s": t_decode,
            "records": rec.records,
            "seq": rec.state.seq,
            "journal_bytes": rec.journal_bytes, "rss_before": rss0, "rss_after": rss1,
            "hwm": hwm, "digest": digest, "ck_digest": _state_digest(loaded),
            "ck_bytes": ck_bytes, "ck_encode_s": t_encode, "ck_write_s": t_write,
            "ck_load_s": t_load}


def bench_replay(report: Report, section: Section) -> None:
    n = 200_000 if report.quick else 1_000_000
    aim = 5.0 * n / 1_000_000
    w = Workload("replay", "journal replay: recover() in a fresh process",
                 {"records": n, "disks": "64 thin 16 GiB, 2 containers",
                  **{f"mix {k}": v for k, v in REPLAY_MIXES.items()}})
    t_w = time.perf_counter()
    for mix in REPLAY_MIXES:
        with _tempdir("replay") as tmp:
            report.progress(f"replay: building a {mix} journal of {n:,} records")
            t0 = time.perf_counter()
            live = build_replay_journal(tmp / JOURNAL, n, mix)
            t_build = time.perf_counter() - t0
            size = (tmp / JOURNAL).stat().st_size
            live_digest = _state_digest(live)
            extents = sum(len(d.extents) for d in live.disks.values())
            ndisks = len(live.disks)
            del live
            gc.collect()
            report.progress(f"replay: recover() of the {mix} journal in a child process")
            r = _run_child("replay", str(tmp))
        if r["digest"] != live_digest or r["ck_digest"] != live_digest:
            raise RuntimeError(f"{mix}: replayed (or checkpointed) state differs from the "
                               "live state")
        w.add(f"{mix}: journal size", size / MiB, "MiB")
        w.add("  bytes per record", size / n, "B")
        w.add("  build (shadow State.apply + frame + write)", t_build, "s")
        w.add(f"{mix}: recover() of {n:,} records, wall", r["recover_s"], "s",
              less_than(aim))
        w.add("  recover() CPU time", r["recover_cpu_s"], "s", less_than(aim))
        w.add("  records per second (wall)", r["records"] / r["recover_s"], "rec/s")
        w.add("  of which frame decode (CRC + msgpack), measured alone", r["decode_s"], "s")
        w.add("  of which State.apply + loop (the rest)", r["recover_s"] - r["decode_s"], "s")
        w.add("  peak RSS of the replaying process", r["hwm"] / MiB, "MiB")
        w.add("  RSS of the recovered state (after - before)",
              (r["rss_after"] - r["rss_before"]) / MiB, "MiB")
        w.add("  replayed state == live state (sha256 of the checkpoint parts)", True)
        w.add(f"{mix}: final state, disks / extents", f"{ndisks} / {extents:,}")
        w.add("  checkpoint of that state: size", r["ck_bytes"] / MiB, "MiB")
        w.add("  checkpoint encode (snapshot, parts, frames)", r["ck_encode_s"] * 1e3, "ms")
        w.add("  checkpoint write (encode, tmp, fsync, rename, fsync dir)",
              r["ck_write_s"] * 1e3, "ms")
        w.add("  checkpoint load (read, CRC, decode, from_parts)", r["ck_load_s"] * 1e3, "ms")
        w.add("  replay time / checkpoint load time", r["recover_s"] / r["ck_load_s"], "x")
    if report.quick:
        w.note(f"quick run: the aim (5 s for 1,000,000 records) is scaled to {aim:.1f} s")
    w.seconds = time.perf_counter() - t_w
    section.workloads.append(w)
    report.emit(w)


# ---------------------------------------------------------------- 3. table size


def _thin_records(size: int, seg: int, seed: int) -> Iterator[tuple[int, int]]:
    """(vstart, length) of every segment of a disk of size, in random order."""
    order = list(range(-(-size // seg)))
    random.Random(seed).shuffle(order)
    for s in order:
        yield s * seg, min(seg, size - s * seg)


def _child_thin_build(state_dir: str, size: int, seg: int, container: str,
                      csize: int) -> dict[str, Any]:
    """Build the fully allocated thin disk with State.apply; write its checkpoint."""
    state = State()
    state.apply(ContainerAdd("c0", 1, container, csize, True), 1)
    gc.collect()
    rss0 = _rss()
    t0 = time.perf_counter()
    state.apply(DiskCreate("thin", size, seg, False, None, 1, 1.7e9, []), 2)
    seq = 2
    for vstart, length in _thin_records(size, seg, seed=7):
        seq += 1
        state.apply(DiskMap("thin", _plan(state, length, vstart)), seq)
    t_build = time.perf_counter() - t0
    gc.collect()
    rss1 = _rss()
    d = state.disks["thin"]
    t0 = time.perf_counter()
    _encode_checkpoint(state)
    t_encode = time.perf_counter() - t0
    t0 = time.perf_counter()
    ck_bytes = write_checkpoint(state_dir, state)
    t_write = time.perf_counter() - t0
    return {"build_s": t_build, "records": seq - 2, "extents": len(d.extents),
            "allocated": d.allocated, "rss_delta": rss1 - rss0,
            "extent_bytes": d.extents.memory_bytes(), "ck_bytes": ck_bytes,
            "ck_encode_s": t_encode, "ck_write_s": t_write}


async def _map_all(addr: str, name: str) -> tuple[int, int, float]:
    """Page through disk.map over RPC; (rows, pages, seconds)."""
    async with open_controller(addr) as c:
        return await _page(c, name)


async def _page(c: Client, name: str) -> tuple[int, int, float]:
    rows = pages = 0
    start: int | None = 0
    t0 = time.perf_counter()
    while start is not None:
        page = await c.call("disk.map", name=name, start=start)
        rows += len(page["rows"])
        pages += 1
        start = page["next"]
    return rows, pages, time.perf_counter() - t0


async def _agent_open(addr: str, name: str) -> tuple[float, float, int, int]:
    """What an agent pays to open a disk: the whole table in one reply, then its cache."""
    from virtfs.mapcache import DiskTable

    async with open_controller(addr, role="agent") as c:
        await c.call("agent.register", name="bench", host="bench", mount="/bench")
        t0 = time.perf_counter()
        t = await c.call("disk.open", name=name)
        t_open = time.perf_counter() - t0
        gc.collect()
        tracemalloc.start()
        t0 = time.perf_counter()
        table = DiskTable(name, t["size"], t["epoch"], t["rows"], t["v"])
        t_table = time.perf_counter() - t0
        del t
        gc.collect()
        used, _peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        n = len(table)
        await c.call("disk.close", name=name)
        await c.call("agent.bye")
    return t_open, t_table, used, n


def _vdctl_seconds(state_dir: Path, *args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "controller.cli", "--state-dir", str(state_dir),
                    *args], cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, check=True)
    return time.perf_counter() - t0


def _service_map_seconds(state: State, name: str, state_dir: Path) -> tuple[int, float]:
    """Service.disk_map paging in-process: the controller's share of a disk map, no RPC."""

    async def page_all() -> tuple[int, float]:
        svc = Service(state, cast(Any, None), str(state_dir))  # disk_map never journals
        rows = 0
        start: int | None = 0
        t0 = time.perf_counter()
        while start is not None:
            page = await svc.disk_map(name, start, None)
            rows += len(page["rows"])
            start = page["next"]
        return rows, time.perf_counter() - t0

    return trio.run(page_all)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t0


def bench_table(report: Report, section: Section) -> None:
    size = 256 * GiB if report.quick else TiB
    per_tib = TiB / size
    csize = size + size // 10
    seg = DEFAULT_SEGMENT_SIZE
    tsz = f"{size // GiB} GiB" if size < TiB else f"{size // TiB} TiB"
    w = Workload("table", f"table size: {tsz} thick and {tsz} thin disks",
                 {"container": f"sparse file, {csize / TiB:.2f} TiB", "segment_size": "4 MiB"})
    t_w = time.perf_counter()
    with _tempdir("table") as tmp:
        # -- thick: the table only. A real thick disk reserves its space in the
        # container's file system (FALLOC_FL_ZERO_RANGE), which this machine's disk
        # cannot hold for 1 TiB; the table is what this measures, so the placement is
        # planned by the real Service code and applied, without touching storage.
        report.progress(f"table: {tsz} thick disk, planned and applied in-process")
        with controller_proc(tmp / "empty") as ctl:
            rss_empty = _rss(ctl.pid)  # the baseline for the thin disk's memory below
        thick_dir = tmp / "thick"
        thick_dir.mkdir(mode=0o700)
        tstate = State()
        tstate.apply(ContainerAdd("c0", 1, str(tmp / "thick.img"), csize, True), 1)

        async def plan_thick() -> tuple[list[list[int]], float]:
            svc = Service(tstate, cast(Any, None), str(thick_dir))
            t0 = time.perf_counter()
            pieces = svc.placement.plan([(0, size)], None, 1)
            return pieces, time.perf_counter() - t0

        pieces, t_plan = trio.run(plan_thick)
        t0 = time.perf_counter()
        tstate.apply(DiskCreate("thick", size, seg, True, None, 1, 0.0,
                                [(a, b, c, d) for a, b, c, d in pieces]), 2)
        t_apply = time.perf_counter() - t0
        rows, t_map = _service_map_seconds(tstate, "thick", thick_dir)
        w.add("thick: extents in the table", len(tstate.disks["thick"].extents), "extents",
              less_than(48))
        w.add("thick: placement planned + applied", (t_plan + t_apply) * 1e3, "ms")
        w.add(f"thick: disk map, all pages in-process ({rows} rows)", t_map * 1e3, "ms")

        # -- thin, built with State.apply in a fresh process
        nseg = -(-size // seg)
        report.progress(f"table: {tsz} thin disk, {nseg:,} disk.map records in random order")
        thin_dir = tmp / "thin"
        thin_dir.mkdir(mode=0o700)
        img = tmp / "thin.img"
        with open(img, "wb") as f:
            f.truncate(csize)
        b = _run_child("thin-build", str(thin_dir), str(size), str(seg), str(img), str(csize))
        if b["allocated"] != size:
            raise RuntimeError(f"thin build: {b['allocated']} bytes allocated, expected {size}")
        w.add(f"thin: extents ({nseg:,} segments in random order)", b["extents"], "extents")
        w.add("thin: build, State.apply of one disk.map per segment", b["build_s"], "s")
        w.add("  per record", b["build_s"] / b["records"] * 1e6, "us")
        w.add("thin: memory per TiB, RSS growth while building",
              b["rss_delta"] * per_tib / MiB, "MiB", less_than(32))
        w.add("thin: memory per TiB, extent arrays alone",
              b["extent_bytes"] * per_tib / MiB, "MiB", less_than(32))
        w.add("  bytes per extent (RSS growth)", b["rss_delta"] / b["extents"], "B")
        w.add("thin: checkpoint size", b["ck_bytes"] / MiB, "MiB")
        w.add("  checkpoint per TiB", b["ck_bytes"] * per_tib / MiB, "MiB")
        w.add("thin: checkpoint encode (snapshot, parts, frames)", b["ck_encode_s"] * 1e3, "ms")
        w.add("thin: checkpoint write (encode + write, fsync'ed)", b["ck_write_s"] * 1e3, "ms")

        # loading it back here: time, then traced memory of the loaded state
        gc.collect()
        _, t_load = _timed(lambda: load_checkpoint(str(thin_dir)))
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            state = load_checkpoint(str(thin_dir))
            gc.collect()
            traced = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        w.add("thin: checkpoint load", t_load * 1e3, "ms")
        w.add("thin: memory per TiB, traced (loaded from checkpoint)",
              traced * per_tib / MiB, "MiB", less_than(32))
        svc_dir = tmp / "svc"
        svc_dir.mkdir(mode=0o700)
        rows_svc, t_svc = _service_map_seconds(state, "thin", svc_dir)
        del state
        w.add(f"thin: Service.disk_map, all pages in-process ({rows_svc:,} rows)",
              t_svc * 1e3, "ms")

        # -- thin, served by a real controller that starts from that checkpoint
        report.progress("table: real controller on the thin disk's checkpoint")
        with controller_proc(thin_dir) as ctl:
            rss_thin = _rss(ctl.pid)
            rows, pages, t_map = trio.run(_map_all, ctl.addr, "thin")
            t_open, t_table, agent_bytes, nrows = trio.run(_agent_open, ctl.addr, "thin")
            t_vdctl = _vdctl_seconds(thin_dir, "disk", "map", "thin")
            t_status = _vdctl_seconds(thin_dir, "status")
            start_s = ctl.ready_seconds
        if rows != b["extents"]:
            raise RuntimeError(f"disk map returned {rows} rows, expected {b['extents']}")
        w.add("thin: controller start on the checkpoint (to listening)", start_s, "s")
        w.add("thin: memory per TiB, controller RSS over an empty one",
              (rss_thin - rss_empty) * per_tib / MiB, "MiB", less_than(32))
        w.add(f"thin: disk map over RPC ({rows:,} rows, {pages} pages)", t_map, "s")
        w.add("  rows per second", rows / t_map, "rows/s")
        w.add(f"agent: disk.open of the thin disk ({nrows:,} rows, whole table)", t_open, "s")
        w.add("agent: building its cached table from the rows", t_table, "s")
        w.add("agent: cached table memory per TiB (traced)", agent_bytes * per_tib / MiB, "MiB")
        w.add("thin: vdctl disk map > /dev/null (whole process)", t_vdctl, "s")
        w.add("  of which vdctl start-up + connect (vdctl status)", t_status, "s")
    if report.quick:
        w.note(f"quick run: a {tsz} disk; per-TiB figures are scaled by {per_tib:.0f}")
    w.note("the thick aim is 'at most a few dozen' extents, shown as < 48")
    w.seconds = time.perf_counter() - t_w
    section.workloads.append(w)
    report.emit(w)


# ---------------------------------------------------------------- 4. scale


SCALE_AIM_TIB = 100  # the pool: 100 TiB of thin disks, 26 million extents
SCALE_MEMORY_AIM = 1.5 * GiB
SCALE_STALL_AIM = 0.050  # s: the longest a checkpoint may hold up the loop
SCALE_RESTART_AIM = 30.0  # s: checkpoint load + journal replay


def _reset_hwm() -> None:
    """Reset this process's VmHWM (peak RSS) to its current RSS (Linux clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


async def _scale_checkpoint(state: State, state_dir: str, nseg: int, seg: int,
                            names: list[str]) -> dict[str, Any]:
    """Checkpoint the big state through Journal._checkpoint while a heartbeat task
    measures the loop's scheduling gaps and a fault task commits thin-disk changes."""
    rnd = random.Random(12)
    j = Journal(state_dir, state, checkpoint_bytes=1 << 62)
    gaps: list[float] = []
    lat: list[float] = []
    in_ck = False
    done = trio.Event()
    stopped = trio.Event()
    faults = 0
    space = state.luns[1].space

    async def heartbeat() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await trio.sleep(0.002)
            now = time.perf_counter()
            if in_ck:
                gaps.append(now - last)
            last = now

    async def fault() -> None:
        # a discard and a new first write of a random segment: two records, each
        # acknowledged after its fdatasync, the way a thin fault is answered
        nonlocal faults
        while not done.is_set():
            g = rnd.randrange(len(names) * nseg)
            name, vstart = names[g // nseg], g % nseg * seg
            t0 = time.perf_counter()
            await j.commit(DiskUnmap(name, vstart, vstart + seg))
            off = space.find_contiguous(seg)
            await j.commit(DiskMap(name, [(vstart, seg, 1, off)]))
            if in_ck:
                lat.append(time.perf_counter() - t0)
                faults += 1
            await trio.sleep(0.001)
        stopped.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(j.run)
        nursery.start_soon(heartbeat)
        nursery.start_soon(fault)
        await trio.sleep(0.3)
        gc.collect()
        rss0 = _rss()
        _reset_hwm()
        t0 = time.perf_counter()
        in_ck = True
        await j._checkpoint()
        in_ck = False
        t_ck = time.perf_counter() - t0
        hwm = _proc_status()["VmHWM"]
        done.set()
        await stopped.wait()
        await j.wait_durable(state.seq)
        nursery.cancel_scope.cancel()
    j.close()
    gaps.sort()
    lat.sort()
    return {"ck_s": t_ck, "ck_bytes": j.last_checkpoint_bytes, "gap_max": gaps[-1],
            "gap_p99": _pct(gaps, 99), "faults": faults, "fault_max": lat[-1] if lat else 0,
            "fault_p50": _pct(lat, 50), "fault_p99": _pct(lat, 99),
            "ck_extra_rss": hwm - rss0}


async def churn(j: Journal, state: State, names: list[str], nseg: int, seg: int,
                nbytes: int, rnd: random.Random) -> int:
    """Run j's committer and record discards and new thin allocations of one seg-byte
    segment of a random disk of names (nseg segments each; LUN 1's space), 2,000 at a
    time group-committed, until j's journal holds nbytes; the records written."""
    space = state.luns[1].space
    records = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(j.run)
        while j.journal_bytes < nbytes:
            for _ in range(2000):
                g = rnd.randrange(len(names) * nseg)
                name, vstart = names[g // nseg], g % nseg * seg
                j.record(DiskUnmap(name, vstart, vstart + seg))
                off = space.find_contiguous(seg)
                j.record(DiskMap(name, [(vstart, seg, 1, off)]))
                records += 2
            await j.wait_durable(state.seq)
        nursery.cancel_scope.cancel()
    return records


async def _scale_fill_journal(state: State, state_dir: str, nseg: int, seg: int,
                              names: list[str], nbytes: int) -> dict[str, Any]:
    """Grow the journal after the checkpoint to nbytes of realistic records (discards
    and new thin allocations, group-committed): the most a restart replays."""
    j = Journal(state_dir, state, checkpoint_bytes=1 << 62)
    t0 = time.perf_counter()
    records = await churn(j, state, names, nseg, seg, nbytes, random.Random(13))
    j.close()
    return {"fill_records": records, "fill_s": time.perf_counter() - t0,
            "journal_bytes": j.journal_bytes}


def _child_scale_build(state_dir: str, tib: int, journal_bytes: int) -> dict[str, Any]:
    """A pool of tib thin 1 TiB disks, every 4 MiB segment allocated by one disk.map
    record through State.apply, in random order across the pool; then a checkpoint
    under load, then a journal of journal_bytes. Leaves both in state_dir."""
    seg = DEFAULT_SEGMENT_SIZE
    nseg = TiB // seg
    names = [f"p{i:03}" for i in range(tib)]
    total = tib * nseg
    state = State()
    # room past the pool for the journal phase's new allocations (the container is
    # never opened: only its table is measured)
    state.apply(ContainerAdd("c0", 1, os.path.join(state_dir, "c0.img"),
                             total * seg + 4 * TiB, True), 1)
    for i, name in enumerate(names):
        state.apply(DiskCreate(name, TiB, seg, False, None, 1, 1.7e9, []), 2 + i)
    order = array("q", range(total))
    random.Random(11).shuffle(order)
    gc.collect()
    rss0 = _rss()
    gc.disable()  # millions of short-lived records: no cyclic garbage to find
    t0 = time.perf_counter()
    seq = state.seq
    apply = state.apply
    # next fit on an empty container hands out consecutive offsets, as the service would
    for k, g in enumerate(order):
        seq += 1
        apply(DiskMap(names[g // nseg], [(g % nseg * seg, seg, 1, k * seg)]), seq)
    t_build = time.perf_counter() - t0
    state.luns[1].space.cursor = total * seg
    del order
    gc.enable()
    gc.collect()
    rss1 = _rss()
    extents = sum(len(d.extents) for d in state.disks.values())
    ext_bytes = sum(d.extents.memory_bytes() for d in state.disks.values())
    t0 = time.perf_counter()
    snap = Snapshot(state)
    t_snap = time.perf_counter() - t0
    snap.release()
    ck = trio.run(_scale_checkpoint, state, state_dir, nseg, seg, names)
    fill = trio.run(_scale_fill_journal, state, state_dir, nseg, seg, names, journal_bytes)
    t0 = time.perf_counter()
    digest = _state_digest(state)
    t_digest = time.perf_counter() - t0
    return {"build_s": t_build, "records": total, "extents": extents,
            "rss_delta": rss1 - rss0, "extent_bytes": ext_bytes, "snapshot_s": t_snap,
            "digest": digest, "digest_s": t_digest, "seq": state.seq, **ck, **fill}


def _child_scale_restart(state_dir: str, what: str) -> dict[str, Any]:
    """recover() (what=recover) or load_checkpoint() alone (what=load) in a fresh process."""
    gc.collect()
    rss0 = _rss()
    _reset_hwm()
    t0 = time.perf_counter()
    if what == "load":
        state = load_checkpoint(state_dir)
        records = 0
    else:
        rec = recover(state_dir, repair=False)
        state, records = rec.state, rec.records
    t = time.perf_counter() - t0
    out: dict[str, Any] = {"s": t, "records": records, "rss": _rss(), "rss_delta": _rss() - rss0,
           "hwm": _proc_status()["VmHWM"], "seq": state.seq}
    if what == "recover":
        out["digest"] = _state_digest(state)
    return out


def bench_scale(report: Report, section: Section) -> None:
    tib = 10 if report.quick else int(os.environ.get("VIRTFS_BENCH_SCALE_TIB", SCALE_AIM_TIB))
    journal_bytes = CHECKPOINT_BYTES
    per = SCALE_AIM_TIB / tib  # to extrapolate size-bound figures to the aim's pool
    w = Workload("scale", f"a {tib} TiB pool of thin disks: memory, checkpoint, restart",
                 {"pool": f"{tib} thin 1 TiB disks, one container",
                  "allocation": "every 4 MiB segment, random order across the pool (no merging)",
                  "journal after the checkpoint": f"{journal_bytes // MiB} MiB"})
    t_w = time.perf_counter()
    with _tempdir("scale") as tmp:
        state_dir = tmp / "state"
        state_dir.mkdir(mode=0o700)
        report.progress(f"scale: building {tib} TiB ({tib * (TiB // DEFAULT_SEGMENT_SIZE):,} "
                        "disk.map records), checkpoint under load, a full journal")
        b = _run_child("scale-build", str(state_dir), str(tib), str(journal_bytes))
        report.progress("scale: recover() and load_checkpoint() in fresh processes")
        r = _run_child("scale-restart", str(state_dir), "recover")
        ld = _run_child("scale-restart", str(state_dir), "load")
        if r["digest"] != b["digest"] or r["seq"] != b["seq"]:
            raise RuntimeError("scale: the restarted state differs from the live one")
        report.progress("scale: a real controller starting on it (and stopping cleanly)")
        with controller_proc(tmp / "empty") as ctl:
            rss_empty = _rss(ctl.pid)
        with controller_proc(state_dir) as ctl:
            start_s = ctl.ready_seconds
            rss_ctl = _rss(ctl.pid)
            t0 = time.perf_counter()
            ctl.__exit__(None, None, None)
            stop_s = time.perf_counter() - t0
    ext = b["extents"]
    w.add("extents in the pool", ext, "extents")
    w.add("build: State.apply of one disk.map per segment", b["build_s"], "s")
    w.add("  per record", b["build_s"] / b["records"] * 1e6, "us")
    w.add("memory: RSS growth while building", b["rss_delta"] / MiB, "MiB")
    w.add("  extent arrays alone", b["extent_bytes"] / MiB, "MiB")
    w.add("  bytes per extent (RSS growth)", b["rss_delta"] / ext, "B")
    mem_aim = less_than(SCALE_MEMORY_AIM / MiB) if per <= 1 else None
    w.add("memory: controller RSS after a restart on it (virtfs-controller)",
          rss_ctl / MiB, "MiB", mem_aim)
    w.add("  of which an empty controller", rss_empty / MiB, "MiB")
    w.add("memory: peak RSS of recover() in a fresh process", r["hwm"] / MiB, "MiB", mem_aim)
    w.add("checkpoint: snapshot on the loop (copy-on-write)", b["snapshot_s"] * 1e3, "ms")
    w.add("checkpoint: written in the background under load", b["ck_s"], "s")
    w.add("  size", b["ck_bytes"] / MiB, "MiB")
    w.add("  bytes per extent", b["ck_bytes"] / ext, "B")
    w.add("  extra memory while it runs (peak RSS over the RSS before)",
          b["ck_extra_rss"] / MiB, "MiB")
    w.add("  longest loop stall (heartbeat every 2 ms)", b["gap_max"] * 1e3, "ms",
          less_than(SCALE_STALL_AIM * 1e3))
    w.add("  heartbeat gap p99", b["gap_p99"] * 1e3, "ms")
    w.add(f"  faults answered meanwhile (unmap + map, 2 fsyncs): {b['faults']}, p50 / p99",
          f"{b['fault_p50'] * 1e3:.1f} / {b['fault_p99'] * 1e3:.1f}", "ms")
    w.add("  slowest fault meanwhile", b["fault_max"] * 1e3, "ms")
    w.add(f"journal after the checkpoint: {b['fill_records']:,} records",
          b["journal_bytes"] / MiB, "MiB")
    w.add("restart: recover() = checkpoint load + journal replay", r["s"], "s",
          less_than(SCALE_RESTART_AIM) if per <= 1 else None)
    w.add("  of which checkpoint load (measured alone)", ld["s"], "s")
    w.add(f"  of which replay of {r['records']:,} records (the rest)", r["s"] - ld["s"], "s")
    w.add("  restarted state == live state (sha256 of the checkpoint parts)", True)
    w.add("restart: virtfs-controller start to listening", start_s, "s",
          less_than(SCALE_RESTART_AIM) if per <= 1 else None)
    w.add("clean stop of that controller (with a full checkpoint)", stop_s, "s")
    if per > 1:
        w.add(f"extrapolated to {SCALE_AIM_TIB} TiB: controller RSS (empty + growth x {per:.0f})",
              (rss_empty + (rss_ctl - rss_empty) * per) / GiB, "GiB",
              less_than(SCALE_MEMORY_AIM / GiB))
        w.add(f"extrapolated to {SCALE_AIM_TIB} TiB: restart (load x {per:.0f} + replay)",
              ld["s"] * per + (r["s"] - ld["s"]), "s", less_than(SCALE_RESTART_AIM))
        w.note(f"a {tib} TiB pool: the aims apply to the {SCALE_AIM_TIB} TiB rows, which "
               f"multiply the size-bound parts by {per:.0f}")
    w.note("the stall aim applies to the loop: the heartbeat task's longest wait while "
           "the checkpoint ran; faults also wait for their own fsyncs, which compete "
           "with the checkpoint's writes for the disk")
    w.seconds = time.perf_counter() - t_w
    section.workloads.append(w)
    report.emit(w)


# ---------------------------------------------------------------- section entry


WORKLOADS: dict[str, Callable[[Report, Section], None]] = {
    "commit": bench_commit,
    "replay": bench_replay,
    "table": bench_table,
    "scale": bench_scale,
}


def run(report: Report, section: Section) -> None:
    for fn in WORKLOADS.values():
        fn(report, section)


def _child_main(argv: list[str]) -> int:
    """``child replay DIR`` | ``child thin-build DIR SIZE SEG CONTAINER CSIZE`` |
    ``child scale-build DIR TIB JOURNAL_BYTES`` | ``child scale-restart DIR recover|load``:
    JSON out."""
    if len(argv) < 2 or argv[0] != "child":
        print("usage: python -m bench.controller child "
              "replay|thin-build|scale-build|scale-restart ...", file=sys.stderr)
        return 2
    kind, rest = argv[1], argv[2:]
    if kind == "replay":
        out = _child_replay(rest[0])
    elif kind == "thin-build":
        out = _child_thin_build(rest[0], int(rest[1]), int(rest[2]), rest[3], int(rest[4]))
    elif kind == "scale-build":
        out = _child_scale_build(rest[0], int(rest[1]), int(rest[2]))
    elif kind == "scale-restart":
        out = _child_scale_restart(rest[0], rest[1])
    else:
        print(f"unknown child {kind!r}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
