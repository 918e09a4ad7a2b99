"""The agent's Prometheus metrics (``virtfs-mount --metrics HOST:PORT``; docs/metrics.md).

Per disk: reads and writes served (ops, bytes, latency), faults by reason and
their latency. Per agent: the lease and the sync debt. None of it costs
anything without ``--metrics``: the data path holds ``None`` then.
"""

from __future__ import annotations

from typing import Any

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram

from controller.metrics_http import LATENCY_BUCKETS, REFRESH, Gauges, Snapshot

from .agent import Session
from .blockio import ContainerIO

# why an I/O could not use its entry (docs/metrics.md)
FAULT_REASONS = ("lease", "allocate", "nowrite", "restricted", "error")


def _observe_many(h: Any, ops: int, seconds: float, buckets: list[int]) -> None:
    """Add ops observations of histogram child h at once: seconds in all, buckets[i] in
    bucket i (prometheus_client's own per-bucket counts; one observe() per op of the
    mean if this prometheus_client keeps them otherwise)."""
    counts = getattr(h, "_buckets", None)
    total = getattr(h, "_sum", None)
    if counts is None or total is None or len(counts) != len(buckets):
        for _ in range(ops):
            h.observe(seconds / ops)
        return
    total.inc(seconds)
    for i, n in enumerate(buckets):
        if n:
            counts[i].inc(n)


class DiskMetrics:
    """One disk's children of the agent's I/O metrics (looked up once per disk)."""

    def __init__(self, m: AgentMetrics, disk: str):
        self.read_ops = m.ops.labels(disk, "read")
        self.read_bytes = m.bytes.labels(disk, "read")
        self.read_seconds = m.seconds.labels(disk, "read")
        self.write_ops = m.ops.labels(disk, "write")
        self.write_bytes = m.bytes.labels(disk, "write")
        self.write_seconds = m.seconds.labels(disk, "write")
        self.faults = {r: m.faults.labels(disk, r) for r in FAULT_REASONS}
        self.fault_seconds = m.fault_seconds.labels(disk)

    def read(self, nbytes: int, seconds: float) -> None:
        """A read of nbytes served in seconds."""
        self.read_ops.inc()
        self.read_bytes.inc(nbytes)
        self.read_seconds.observe(seconds)

    def read_many(self, ops: int, nbytes: int, seconds: float, buckets: list[int]) -> None:
        """ops reads of nbytes in all, served in seconds in all by the C fast path
        (cfast.py); buckets: how many fell in each bucket of LATENCY_BUCKETS (the
        last: above them all), as the histogram's observe() would have counted them."""
        self.read_ops.inc(ops)
        self.read_bytes.inc(nbytes)
        _observe_many(self.read_seconds, ops, seconds, buckets)

    def write_many(self, ops: int, nbytes: int, seconds: float, buckets: list[int]) -> None:
        """ops writes served by the C fast path: as read_many."""
        self.write_ops.inc(ops)
        self.write_bytes.inc(nbytes)
        _observe_many(self.write_seconds, ops, seconds, buckets)

    def write(self, nbytes: int, seconds: float) -> None:
        """A write of nbytes served in seconds."""
        self.write_ops.inc()
        self.write_bytes.inc(nbytes)
        self.write_seconds.observe(seconds)

    def fault(self, reason: str, seconds: float) -> None:
        """An entry that could not be used (reason: FAULT_REASONS), resolved in seconds."""
        self.faults[reason].inc()
        self.fault_seconds.observe(seconds)


class AgentMetrics:
    """The agent's metrics in registry; run() keeps the lease and debt gauges fresh."""

    def __init__(self, registry: CollectorRegistry, session: Session, io: ContainerIO):
        self.session = session
        self.io = io
        self.ops = Counter("virtfs_agent_io", "Reads and writes served, by disk",
                           ["disk", "op"], registry=registry)
        self.bytes = Counter("virtfs_agent_io_bytes", "Bytes read and written, by disk",
                             ["disk", "op"], registry=registry)
        self.seconds = Histogram("virtfs_agent_io_seconds", "Time to serve a read or "
                                 "write, faults included", ["disk", "op"],
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.faults = Counter("virtfs_agent_faults", "I/Os that met an entry they could "
                              "not use, by reason", ["disk", "reason"], registry=registry)
        self.fault_seconds = Histogram("virtfs_agent_fault_seconds", "Time from a fault "
                                       "to a usable entry", ["disk"],
                                       buckets=LATENCY_BUCKETS, registry=registry)
        self._disks: dict[str, DiskMetrics] = {}
        self.snapshot = Snapshot(self._gauges)
        registry.register(self.snapshot)

    def disk(self, name: str) -> DiskMetrics:
        """The metrics of disk name (made on first use)."""
        m = self._disks.get(name)
        if m is None:
            m = self._disks[name] = DiskMetrics(self, name)
        return m

    def _gauges(self) -> Gauges:
        s = self.session
        left = max(0.0, s.lease_until - trio.current_time())
        debt = self.io.unsynced()
        return [
            ("virtfs_agent_lease_valid", "1 while the agent holds a valid lease", [],
             [([], 1.0 if s.lease_valid() else 0.0)]),
            ("virtfs_agent_lease_remaining_seconds", "Seconds left on the lease", [],
             [([], left)]),
            ("virtfs_agent_connected", "1 while connected to a controller", [],
             [([], 1.0 if s.client is not None else 0.0)]),
            ("virtfs_agent_unsynced_writes", "Writes to a container that no fdatasync "
             "has covered yet (the sync debt), by LUN", ["lun"],
             [([str(lun)], float(n)) for lun, n in sorted(debt.items())]),
        ]

    async def run(self) -> None:
        """Refresh the gauges every metrics_http.REFRESH seconds, forever."""
        while True:
            self.snapshot.refresh()
            await trio.sleep(REFRESH)
