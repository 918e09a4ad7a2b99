"""controller/storage.py's write gate: every container write the controller makes asks
may_write right before its system call (docs/ha.md, "Split brain"), and the term's
in_force() answers it from a worker thread without touching the term."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from controller import faultpoints, storage
from controller import label as L
from controller.election import Term
from controller.protocol import RemoteError
from controller.writegate import Fenced, gate, unfenced

MB = 1 << 20


class Gate:
    """A WriteGate that says yes `allow` times, then no; counts the questions."""

    def __init__(self, allow: int) -> None:
        self.allow = allow
        self.asked = 0

    def __call__(self) -> bool:
        self.asked += 1
        return self.asked <= self.allow


def _file(path: Path, size: int, fill: int) -> bytes:
    data = bytes([fill]) * size
    path.write_bytes(data)
    return data


def test_a_copy_stops_between_chunks_once_the_gate_closes(tmp_path: Path) -> None:
    chunk = storage._COPY_CHUNK
    src = _file(tmp_path / "src", 3 * chunk, 0xAB)
    dst = tmp_path / "dst"
    before = _file(dst, 3 * chunk, 0x11)
    gate = Gate(allow=1)  # the first chunk only
    with pytest.raises(Fenced) as ei:
        storage.copy_ranges([(str(tmp_path / "src"), 0, str(dst), 0, 3 * chunk)], gate)
    assert ei.value.errno == 5 and "no longer leads its group" in str(ei.value)
    after = dst.read_bytes()
    assert after[:chunk] == src[:chunk]  # written while the gate was open
    assert after[chunk:] == before[chunk:]  # nothing after it closed
    assert gate.asked == 2
    # the oracle can fail: with the gate open throughout, every chunk lands
    storage.copy_ranges([(str(tmp_path / "src"), 0, str(dst), 0, 3 * chunk)], Gate(99))
    assert dst.read_bytes() == src


def test_zeroing_punching_and_labels_write_nothing_behind_a_closed_gate(
        tmp_path: Path) -> None:
    img = tmp_path / "c.img"
    data = _file(img, 4 * MB, 0x5A)
    closed = Gate(allow=0)
    for call in (lambda: storage.zero_ranges(str(img), [(MB, MB)], False, closed),
                 lambda: storage.zero_ranges(str(img), [(MB, MB)], True, closed),
                 lambda: storage.release_ranges(str(img), [(MB, MB)], closed),
                 lambda: storage.zero_bytes(str(img), 100, 50, closed),
                 lambda: L.write_beat(str(img), L.Beat("a" * 32, "b" * 32, 1, 1.0, 1.0, 0.0),
                                      closed),
                 lambda: L.wipe(str(img), closed),
                 lambda: L.wipe_signatures(str(img), closed)):
        with pytest.raises(Fenced):
            call()
    assert img.read_bytes() == data
    with pytest.raises(RemoteError, match="no longer leads"):  # E_IO; not even created
        storage.open_container_path(str(tmp_path / "new.img"), MB, {}, closed)
    assert not (tmp_path / "new.img").exists()
    # the oracle can fail: open, the punch lands
    storage.release_ranges(str(img), [(MB, MB)], Gate(99))
    assert img.read_bytes()[MB:2 * MB] == bytes(MB)


async def test_in_force_answers_from_a_worker_thread_and_changes_nothing() -> None:
    t = Term(7, 1, 2, trio.current_time() + 0.3)
    assert await trio.to_thread.run_sync(t.in_force)
    await trio.sleep(0.35)
    # past the lease by its own clock: no, from the thread, with no trio call made there
    assert not await trio.to_thread.run_sync(t.in_force)
    assert t.lost is None  # read-only: the trio side's check() ends the term
    t.expires = trio.current_time() + 10
    assert t.in_force()
    t.lose("etcd said so")
    assert not await trio.to_thread.run_sync(t.in_force)


def test_the_standalone_gate_costs_nothing_measurable(tmp_path: Path) -> None:
    """writegate.unfenced is a function that returns True: one call per 4 MiB chunk."""
    assert unfenced() is True
    n = 100_000
    t0 = os.times().elapsed
    for _ in range(n):
        gate(unfenced, "x")
    per_call = (os.times().elapsed - t0) / n
    assert per_call < 20e-6, per_call  # (about 0.1 us here; a 4 MiB copy takes ms)


async def test_a_copy_thread_holds_before_a_chunk_then_asks_the_gate(
        tmp_path: Path, arm_faults) -> None:
    """storage.copy_chunk=hold:FILE parks the copy's worker thread before a chunk (the
    group test's pause point); once FILE is gone the chunk asks the gate, then writes."""
    chunk = storage._COPY_CHUNK
    src = _file(tmp_path / "src", 2 * chunk, 0xCD)
    dst = tmp_path / "dst"
    _file(dst, 2 * chunk, 0)
    hold = tmp_path / "hold"
    hold.touch()
    arm_faults(f"storage.copy_chunk=hold:{hold}@2")
    gate = Gate(allow=99)
    async with trio.open_nursery() as n:
        n.start_soon(trio.to_thread.run_sync, storage.copy_ranges,
                     [(str(tmp_path / "src"), 0, str(dst), 0, 2 * chunk)], gate)
        await trio.sleep(0.5)
        assert faultpoints.hits("storage.copy_chunk") == 2 and gate.asked == 1  # parked
        hold.unlink()
    assert gate.asked == 3 and dst.read_bytes() == src  # two chunks and the settling
