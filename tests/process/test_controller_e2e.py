"""End to end through vdctl against a real virtfs-controller process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import trio
from rig import ControllerProc

from controller.client import open_controller
from controller.protocol import LABEL_BYTES

B = 4096
G = 1 << 30


def round_up(n: int) -> int:
    return -(-n // B) * B


def ok(r):
    assert r.rc == 0, f"rc {r.rc}: {r.err}"
    return r


def usage_adds_up(v) -> dict[str, dict]:
    """used == sum of the disks' block-rounded bytes on each container; used+free == usable."""
    conts = {c["name"]: c for c in ok(v("container", "ls", "--format", "json")).json()}
    per: dict[str, int] = dict.fromkeys(conts, 0)
    total_alloc = 0
    for d in ok(v("disk", "ls", "--format", "json")).json():
        info = ok(v("disk", "info", d["name"], "--format", "json")).json()
        assert sum(p["bytes"] for p in info["placement"]) == d["allocated"]
        for p in info["placement"]:
            per[p["container"]] += round_up(p["bytes"])  # only the tail is short
        total_alloc += d["allocated"]
    for name, c in conts.items():
        assert c["used"] == per[name], (name, c, per)
        assert c["used"] + c["free"] == c["usable"] == c["size"] - c["size"] % B - LABEL_BYTES, c
    return conts


def mapped_ranges(v, name: str) -> list[tuple[str, int, int]]:
    m = ok(v("disk", "map", name, "--format", "json")).json()
    return [(e["container"], e["offset"], round_up(e["length"])) for e in m["entries"]
            if e["container"] is not None]


def assert_no_overlap(v) -> None:
    seen: dict[str, list[tuple[int, int, str]]] = {}
    for d in ok(v("disk", "ls", "--format", "json")).json():
        for cont, off, n in mapped_ranges(v, d["name"]):
            seen.setdefault(cont, []).append((off, n, d["name"]))
    for cont, ranges in seen.items():
        ranges.sort()
        for (o1, n1, d1), (o2, _n2, d2) in zip(ranges, ranges[1:], strict=False):
            assert o2 >= o1 + n1, f"{cont}: {d1} and {d2} overlap at {o2}"


def snapshot(v) -> dict[str, str]:
    out = {"disks": ok(v("disk", "ls", "--format", "json")).out,
           "containers": ok(v("container", "ls", "--format", "json")).out}
    for d in ok(v("disk", "ls", "--format", "json")).json():
        out["map " + d["name"]] = ok(v("disk", "map", d["name"], "--format", "json")).out
    return out


def test_lifecycle_restart_and_kill(controller, tmp_path):
    v = controller.vdctl
    c1, c2 = tmp_path / "c1.img", tmp_path / "c2.img"
    ok(v("container", "add", "c1", str(c1), "--size", "3G"))
    c2.write_bytes(b"")
    os.truncate(c2, (2 << 30) + 1000)  # an existing file, not a multiple of 4 KiB
    r = ok(v("container", "add", "c2", str(c2), "--format", "json")).json()
    # whole blocks only, and the first one is the label's (docs/labels.md)
    assert r["size"] == (2 << 30) + 1000 and r["created"] is False
    assert r["free"] == r["usable"] == (2 << 30) - LABEL_BYTES
    assert os.path.getsize(c1) == 3 << 30
    assert os.stat(c1).st_blocks * 512 <= LABEL_BYTES  # sparse but for its label

    sizes = {"thin-odd": ("12345", 12345), "thin-big": ("1T", 1 << 40),
             "thin-g1": ("1G", G), "thick-odd": ("12345", 12345),
             "thick-g1": ("1G", G + 1), "thick-4k": ("4096", 4096),
             "thick-15": ("1.5M", 3 << 19)}
    for name, (text, size) in sizes.items():
        args = ["disk", "create", name, "--size", text if name != "thick-g1" else str(size)]
        if name.startswith("thick"):
            args.append("--thick")
        info = ok(v(*args, "--format", "json")).json()
        assert info["size"] == size
        assert info["allocated"] == (size if name.startswith("thick") else 0)
        assert info["provisioning"] == ("thick" if name.startswith("thick") else "thin")

    table = ok(v("disk", "ls")).out.splitlines()
    assert table[0].split()[:4] == ["NAME", "SIZE", "TYPE", "ALLOCATED"]
    assert sorted(line.split()[0] for line in table[1:]) == sorted(sizes)
    row = next(line.split() for line in table if line.startswith("thick-odd "))
    assert row[1:4] == ["~12.1K", "thick", "~12.1K"], row  # rounded, and marked so
    exact = ok(v("disk", "ls", "--bytes")).out.splitlines()
    row = next(line.split() for line in exact if line.startswith("thick-odd "))
    assert row[1:4] == ["12345", "thick", "12345"], row
    listed = ok(v("disk", "ls", "--format", "json")).json()
    assert [d["name"] for d in listed] == sorted(sizes)
    ctable = ok(v("container", "ls")).out.splitlines()
    assert ctable[0].split()[0] == "NAME" and len(ctable) == 3
    # global options before the noun work too
    assert ok(v("--format", "json", "disk", "ls")).json() == listed

    m = ok(v("disk", "map", "thick-odd", "--format", "json")).json()
    assert m["size"] == 12345
    assert sum(e["length"] for e in m["entries"]) == 12345
    assert all(e["state"] == ["valid"] for e in m["entries"])
    thin = ok(v("disk", "map", "thin-odd", "--format", "json")).json()
    assert [(e["vstart"], e["length"], e["state"]) for e in thin["entries"]] == [
        (0, 12345, ["zero"])]
    assert "VSTART" in ok(v("disk", "map", "thick-g1")).out
    usage_adds_up(v)
    assert_no_overlap(v)

    # resize: absolute grow, +SIZE, -SIZE refused without --allow-shrink, then allowed
    r = ok(v("disk", "resize", "thick-odd", "20000", "--format", "json")).json()
    assert r["size"] == 20000 and r["allocated"] == 20000
    r = ok(v("disk", "resize", "thick-odd", "+1M", "--format", "json")).json()
    assert r["size"] == 20000 + (1 << 20) and r["allocated"] == r["size"]
    before = snapshot(v)
    bad = v("disk", "resize", "thick-odd", "-1M")
    assert bad.rc == 1 and "--allow-shrink" in bad.err and len(bad.err.splitlines()) == 1
    bad = v("disk", "resize", "thick-odd", "100")
    assert bad.rc == 1 and "--allow-shrink" in bad.err
    assert snapshot(v) == before
    r = ok(v("disk", "resize", "thick-odd", "-1M", "--allow-shrink", "--format", "json")).json()
    assert r["size"] == 20000 and r["allocated"] == 20000
    r = ok(v("disk", "resize", "thick-g1", "-1", "--allow-shrink", "--format", "json")).json()
    assert r["size"] == G and r["allocated"] == G
    r = ok(v("disk", "resize", "thin-g1", "+1G", "--format", "json")).json()
    assert r["size"] == 2 * G and r["allocated"] == 0
    r = ok(v("disk", "resize", "thin-g1", "-512M", "--allow-shrink", "--format", "json")).json()
    assert r["size"] == 3 * G // 2
    usage_adds_up(v)
    assert_no_overlap(v)

    # removal frees the space
    free_before = sum(c["free"] for c in usage_adds_up(v).values())
    r = ok(v("disk", "rm", "thick-15", "--format", "json")).json()
    assert "removed" in v("disk", "rm", "thick-4k").err
    free_after = sum(c["free"] for c in usage_adds_up(v).values())
    assert free_after - free_before == (3 << 19) + 4096
    assert v("disk", "info", "thick-15").rc == 1

    chk = ok(v("check"))
    assert "clean" in chk.out
    assert ok(v("check", "--format", "json")).json()["ok"] is True

    before = snapshot(v)
    controller.restart()
    assert snapshot(v) == before, "state changed across a clean restart"
    controller.kill()
    controller.start()
    assert snapshot(v) == before, "state changed across kill -9 and restart"
    ok(v("check"))
    usage_adds_up(v)


def test_thick_allocation_never_overlaps_and_is_freed(controller, tmp_path):
    v = controller.vdctl
    ok(v("container", "add", "a", str(tmp_path / "a.img"), "--size", "64M"))
    ok(v("container", "add", "b", str(tmp_path / "b.img"), "--size", "40M"))
    # fill, punch holes by removal, refill: the fragmentation makes multi-piece placements
    for i in range(20):
        ok(v("disk", "create", f"d{i}", "--size", str(3 * (1 << 20) + i * 777), "--thick"))
    for i in range(0, 20, 3):
        ok(v("disk", "rm", f"d{i}"))
    for i in range(20, 26):
        ok(v("disk", "create", f"d{i}", "--size", str(5 * (1 << 20) + 1), "--thick"))
    ok(v("disk", "resize", "d1", "+7M"))  # thick grow allocates, maybe elsewhere
    ok(v("disk", "create", "pinned", "--size", "1M", "--thick", "--container", "b"))
    info = ok(v("disk", "info", "pinned", "--format", "json")).json()
    assert [p["container"] for p in info["placement"]] == ["b"]
    usage_adds_up(v)
    assert_no_overlap(v)
    ok(v("check"))
    for d in ok(v("disk", "ls", "--format", "json")).json():
        ok(v("disk", "rm", d["name"]))
    conts = usage_adds_up(v)
    assert all(c["used"] == 0 for c in conts.values())
    ok(v("container", "rm", "a"))
    assert [c["name"] for c in ok(v("container", "ls", "--format", "json")).json()] == ["b"]


def test_second_controller_on_same_state_dir_refused(controller, tmp_path):
    other = ControllerProc(controller.state_dir, tmp_path / "second.log")
    other.start(wait=False)
    assert other.proc is not None
    rc = other.proc.wait(30)
    other.proc = None
    other.log.close()
    assert rc == 1
    log = (tmp_path / "second.log").read_text()
    assert "in use" in log and str(controller.state_dir) in log
    assert "Traceback" not in log
    ok(controller.vdctl("status"))  # the first one is unharmed


def test_vdctl_without_controller_fails_cleanly(tmp_path):
    from rig import run_vdctl
    t = time.monotonic()
    r = run_vdctl("--state-dir", str(tmp_path / "nothing"), "disk", "ls")
    assert r.rc == 1 and r.err.startswith("vdctl: error:") and len(r.err.splitlines()) == 1
    assert "controller" in r.err and time.monotonic() - t < 10


SEG = 4 << 20


BIN = Path(sys.executable).parent


def _wait_socket(sock: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


def test_thin_faults_sync_only_the_new_range(tmp_path: Path) -> None:
    """strace the controller's syscalls on the container: no fdatasync/fsync, only the
    range-limited RWF_DSYNC writes (which the trace must see, or it proves nothing)."""
    state, img, trace = tmp_path / "s", tmp_path / "c1.img", tmp_path / "trace"
    state.mkdir()
    img.write_bytes(b"")
    os.truncate(img, 256 << 20)
    log = tmp_path / "controller.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["strace", "-f", "-o", str(trace), "-P", str(img),
             "-e", "trace=fdatasync,fsync,pwritev2,pwrite64",
             str(BIN / "virtfs-controller"), "--state-dir", str(state)],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_socket(state / "controller.sock", proc, log)
        addr = f"unix:{state}/controller.sock"

        async def faults() -> None:
            async with open_controller(addr) as adm, open_controller(addr, role="agent") as ag:
                await adm.call("container.add", name="c1", path=str(img), size=None)
                await adm.call("disk.create", name="x", size=64 << 20)
                await ag.call("agent.register", name="a", host="h", mount="/m")
                await ag.call("disk.open", name="x")
                for i in range(4):
                    r = await ag.call("disk.fault", name="x", offset=i * SEG, length=4096,
                                      write=True)
                    assert r["rows"][0][4] == 0, r  # a plain valid entry

        trio.run(faults)
    finally:
        # stop the controller itself (strace exits with it)
        kids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
        for pid in kids.stdout.split():
            os.kill(int(pid), 15)
        try:
            proc.wait(20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    calls = [ln for ln in trace.read_text().splitlines() if "(" in ln]
    syncs = [ln for ln in calls if "fdatasync(" in ln or "fsync(" in ln]
    dsync = [ln for ln in calls if "pwritev2(" in ln and "RWF_DSYNC" in ln]
    assert not syncs, syncs
    assert len(dsync) >= 4, calls


async def test_concurrent_container_add_on_one_path(controller, tmp_path):
    path = str(tmp_path / "same.img")
    addr = "unix:" + str(controller.sock)
    results: list[str] = []

    async def add(name: str) -> None:
        async with open_controller(addr) as c:
            try:
                await c.call("container.add", name=name, path=path, size=2 << 20)
                results.append("ok")
            except Exception as e:
                results.append(type(e).__name__)

    async with trio.open_nursery() as n:
        for i in range(4):
            n.start_soon(add, f"c{i}")
    assert results.count("ok") == 1, results
    async with open_controller(addr) as c:
        assert len(await c.call("container.ls")) == 1
        assert (await c.call("check"))["ok"]
    # the losers never unlink the file the winner registered
    assert os.path.exists(path)  # noqa: ASYNC240 - a test, after the work is done
