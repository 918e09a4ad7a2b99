"""kill -9 of the controller under ~1000 concurrent disk.create requests."""

from __future__ import annotations

import os
import signal

import trio

from controller import protocol as P
from controller.client import ConnectionLost, open_controller

N_REQUESTS = 1000
N_CONNECTIONS = 10
KILL_AFTER = 300  # acknowledgements before the kill


def test_kill_during_concurrent_creates(controller, tmp_path):
    v = controller.vdctl
    assert v("container", "add", "c1", str(tmp_path / "c1.img"), "--size", "8G").rc == 0
    assert v("container", "add", "c2", str(tmp_path / "c2.img"), "--size", "1G").rc == 0
    addr = f"unix:{controller.sock}"
    pid = controller.proc.pid
    acked: set[str] = set()
    failed: list[str] = []
    killed = trio.Event()

    def size_of(i: int) -> int:
        return 4096 * (1 + i % 7) + (i % 5) * 1000

    async def one(c, i: int) -> None:
        name = f"d{i:04d}"
        try:
            await c.call("disk.create", name=name, size=size_of(i), thick=i % 4 != 0)
        except (ConnectionLost, P.RemoteError) as e:
            failed.append(f"{name}: {e}")
            return
        acked.add(name)
        if len(acked) >= KILL_AFTER and not killed.is_set():
            os.kill(pid, signal.SIGKILL)
            killed.set()

    async def worker(k: int) -> None:
        try:
            async with open_controller(addr) as c, trio.open_nursery() as n:
                for i in range(k, N_REQUESTS, N_CONNECTIONS):
                    n.start_soon(one, c, i)
        except ConnectionLost:
            pass

    async def run_all() -> None:
        with trio.fail_after(120):
            async with trio.open_nursery() as n:
                for k in range(N_CONNECTIONS):
                    n.start_soon(worker, k)

    trio.run(run_all)  # vdctl runs its own trio loop, so this test is sync
    assert killed.is_set(), "all requests finished before the kill"
    assert len(acked) < N_REQUESTS, "the kill came too late to test anything"
    assert failed, "no request was cut off by the kill"

    # the fixture's process is gone; reap it and start a new controller
    controller.proc.wait()
    controller.proc = None
    controller.log.close()
    controller.start()
    disks = {d["name"]: d for d in v("disk", "ls", "--format", "json").json()}
    missing = sorted(acked - set(disks))
    assert not missing, f"{len(missing)} acknowledged creates lost: {missing[:5]}"
    for name, d in disks.items():
        i = int(name[1:])
        assert d["size"] == size_of(i)
        assert d["allocated"] == (d["size"] if i % 4 != 0 else 0)
    chk = v("check")
    assert chk.rc == 0, chk.out
    conts = v("container", "ls", "--format", "json").json()
    used = sum(c["used"] for c in conts)
    assert used == sum(-(-d["allocated"] // 4096) * 4096 for d in disks.values())
    # and it still serves
    assert v("disk", "create", "after", "--size", "1M", "--thick").rc == 0
    assert v("check").rc == 0
