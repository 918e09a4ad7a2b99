"""Fencing edges (issue 10 item 2; docs/fencing.md has the timing argument).

- An agent whose lease has run out stops container I/O on every entry that could
  change (reads and writes of mapped blocks, not only new faults) until it has
  renewed: with the controller frozen (SIGSTOP), its I/O waits, then goes on.
- The controller waits out an unreachable agent's lease (plus the margin) before it
  frees storage that agent may write: a shrink under a frozen agent takes at least
  that long, never less.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest
from rig import BLOCK, add_container, agent, dread, dwrite, open_direct, vd

LEASE = 2.0
MARGIN = 0.5  # controller/agents.py LEASE_MARGIN


@pytest.mark.parametrize("fast", ["1", "0", "c"], ids=["fast-path", "general-path", "c-path"])
def test_agent_past_its_lease_does_no_container_io(controller, mount_factory, tmp_path, fast):
    """On the data path's fast path (a plain valid entry: virtfs/datapath.py), with
    VIRTFS_FASTPATH=0 on the general path, and with the C readers on (reads served in C
    until the lease deadline they hold: virtfs/cfast.py)."""
    controller.stop()
    controller.start(["--lease", str(LEASE)])
    add_container(controller, "c1", tmp_path / "c1.img", "64M")
    vd(controller, "disk", "create", "d", "--size", "8M")
    m = agent(mount_factory, controller, args=["--fault-timeout", "30"],
              env={"VIRTFS_FAST_THREADS": "2"} if fast == "c" else {
                  "VIRTFS_FASTPATH": fast, "VIRTFS_FAST_THREADS": "0"})
    fd = open_direct(m.path / "d")
    try:
        dwrite(fd, 0, b"A" * BLOCK)  # allocated and mapped: a plain valid entry
        for _ in range(3):  # (the first read in Python builds the C table: then C)
            assert dread(fd, 0, BLOCK) == b"A" * BLOCK
        assert controller.proc is not None
        os.kill(controller.proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            time.sleep(LEASE + 0.5)  # the agent's lease has run out by now
            done: dict[str, float] = {}

            def io(kind: str) -> None:
                if kind == "write":
                    dwrite(fd, 0, b"B" * BLOCK)
                else:
                    dread(fd, 0, BLOCK)
                done[kind] = time.monotonic()

            threads = [threading.Thread(target=io, args=(k,)) for k in ("write", "read")]
            for t in threads:
                t.start()
            time.sleep(1.5)
            assert done == {}, f"I/O went on without a lease: {done}"
            # the container still holds the old block: nothing landed
            with open(tmp_path / "c1.img", "rb") as f:
                assert b"B" * BLOCK not in f.read(8 << 20)
        finally:
            os.kill(controller.proc.pid, signal.SIGCONT)
        for t in threads:
            t.join(30)
        assert set(done) == {"write", "read"}, "I/O did not resume after the lease renewed"
        assert min(done.values()) > stopped + LEASE
        assert dread(fd, 0, BLOCK) == b"B" * BLOCK
    finally:
        os.close(fd)


def test_controller_waits_out_a_silent_agents_lease(controller, mount_factory, tmp_path):
    controller.stop()
    controller.start(["--lease", str(LEASE)])
    add_container(controller, "c1", tmp_path / "c1.img", "64M")
    vd(controller, "disk", "create", "d", "--size", "8M")
    m = agent(mount_factory, controller, args=["--fault-timeout", "30"])
    fd = open_direct(m.path / "d")
    try:
        dwrite(fd, 4 << 20, b"C" * BLOCK)
        os.kill(m.pid, signal.SIGSTOP)  # holds d open, will never ack
        try:
            t0 = time.monotonic()
            vd(controller, "disk", "resize", "d", "4M", "--allow-shrink")
            took = time.monotonic() - t0
        finally:
            os.kill(m.pid, signal.SIGCONT)
    finally:
        os.close(fd)
    # it may not free the agent's storage before the agent's lease has surely run out
    assert took >= LEASE - 0.5, f"the shrink went through after {took:.2f} s"
    assert controller.vdctl("check").rc == 0


def test_paused_agent_is_dropped_and_reloads(controller, mount_factory, tmp_path):
    """An agent that sleeps through its lease must not come back with a stale table."""
    controller.stop()
    controller.start(["--lease", "2"])
    add_container(controller, "c1", tmp_path / "c1.img", "1088K")  # 64K after its label
    vd(controller, "disk", "create", "d", "--size", "32K")
    m = agent(mount_factory, controller, args=["--fault-timeout", "20"])
    fd = open_direct(m.path / "d")
    try:
        dwrite(fd, 0, b"D" * (8 * BLOCK))
        os.kill(m.pid, signal.SIGSTOP)
        try:
            vd(controller, "disk", "resize", "d", "4K", "--allow-shrink")  # waits the lease
        finally:
            os.kill(m.pid, signal.SIGCONT)
        # the controller dropped the sleeper; its table is reloaded before any new write
        vd(controller, "disk", "create", "e", "--size", "28K", "--thick")
        with pytest.raises(OSError):
            dwrite(fd, 4 * BLOCK, b"X" * BLOCK)  # past the new end: refused, lands nowhere
        dwrite(fd, 0, b"Y" * BLOCK)
        assert dread(fd, 0, BLOCK) == b"Y" * BLOCK
        # the agent registered again and re-opened d with a fresh table
        ls = vd(controller, "agent", "ls", "--format", "json").json()
        assert [a["disks"] for a in ls] == [["d"]], ls
        assert os.fstat(fd).st_size == 4096
    finally:
        os.close(fd)
    e_data = subprocess.run(["dd", f"if={m.path / 'e'}", "bs=28K", "count=1", "iflag=direct",
                             "status=none"], capture_output=True, check=True).stdout
    assert e_data == bytes(28 << 10)  # nothing of d's ever landed in e
    assert controller.vdctl("check").rc == 0
