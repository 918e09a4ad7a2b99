"""The controller's Prometheus metrics (``virtfs-controller --metrics HOST:PORT``;
docs/metrics.md).

Counted where they happen: operations by name and outcome (``wrap``, around the
server's dispatch), journal group commits (latency, records, bytes) and
checkpoints (``Journal.on_commit``/``on_checkpoint``). Read off the tables
once a second (``run``): containers, disks, running jobs, agents.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.registry import Collector

from . import protocol as P
from .metrics_http import LATENCY_BUCKETS, REFRESH, Gauges, Snapshot
from .service import Service

Dispatch = Callable[..., Awaitable[object]]
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class ControllerMetrics:
    """The controller's metrics in registry, for service.

    A group member's registry outlives its terms: each term's service registers its
    own ControllerMetrics and ``close()`` takes them out again when the term ends, so
    the next term registers the same names without a duplicate-collector error (its
    counters start again from 0: a reset, which Prometheus's ``rate()`` allows for)."""

    def __init__(self, registry: CollectorRegistry, service: Service):
        self.registry = registry
        self.service = service
        self.ops = Counter("virtfs_controller_ops", "Requests answered, by operation and "
                           "outcome (ok or the error code)", ["op", "code"],
                           registry=registry)
        self.op_seconds = Histogram("virtfs_controller_op_seconds", "Time to answer a "
                                    "request, by operation", ["op"],
                                    buckets=LATENCY_BUCKETS, registry=registry)
        self.commit_seconds = Histogram("virtfs_journal_commit_seconds", "Time to make one "
                                        "group commit durable (write + fdatasync)",
                                        buckets=LATENCY_BUCKETS, registry=registry)
        self.commit_records = Histogram("virtfs_journal_commit_records", "Records per group "
                                        "commit", buckets=BATCH_BUCKETS, registry=registry)
        self.commit_bytes = Counter("virtfs_journal_written_bytes", "Bytes appended to the "
                                    "journal", registry=registry)
        self.checkpoint_seconds = Histogram("virtfs_checkpoint_seconds", "Time to write a "
                                            "checkpoint", buckets=LATENCY_BUCKETS + (60, 300),
                                            registry=registry)
        self.checkpoint_bytes = Counter("virtfs_checkpoint_written_bytes", "Bytes of "
                                        "checkpoints written", registry=registry)
        self.snapshot = Snapshot(self._gauges)
        registry.register(self.snapshot)
        self._collectors: list[Collector] = [
            self.ops, self.op_seconds, self.commit_seconds, self.commit_records,
            self.commit_bytes, self.checkpoint_seconds, self.checkpoint_bytes, self.snapshot]
        j = service.journal
        j.on_commit = self._committed
        j.on_checkpoint = self._checkpointed

    def close(self) -> None:
        """Take every metric of this service out of the registry (the term ended)."""
        for c in self._collectors:
            self.registry.unregister(c)
        self._collectors = []

    def _committed(self, records: int, nbytes: int, seconds: float) -> None:
        self.commit_seconds.observe(seconds)
        self.commit_records.observe(records)
        self.commit_bytes.inc(nbytes)

    def _checkpointed(self, nbytes: int, seconds: float) -> None:
        self.checkpoint_seconds.observe(seconds)
        self.checkpoint_bytes.inc(nbytes)

    def wrap(self, dispatch: Dispatch) -> Dispatch:
        """dispatch, counting each request by op and outcome, and timing it."""
        async def counted(op: str, args: dict[str, object], conn: Any = None) -> object:
            t0 = time.perf_counter()
            code = "ok"
            try:
                return await dispatch(op, args, conn)
            except P.RemoteError as e:
                code = e.code
                raise
            except BaseException:
                code = P.E_INTERNAL
                raise
            finally:
                self.ops.labels(op, code).inc()
                self.op_seconds.labels(op).observe(time.perf_counter() - t0)
        return counted

    def _gauges(self) -> Gauges:
        svc = self.service
        s = svc.state
        cs = sorted(s.containers.values(), key=lambda c: c.lun)
        disks = sorted(s.disks.values(), key=lambda d: d.name)
        running = [svc.jobs.job_dict(j) for j in s.jobs.values() if j.state == "running"]
        now = trio.current_time()
        agents = sorted(svc.agents.agents.values(), key=lambda a: a.id)

        def per_container(v: Callable[[Any], int]) -> list[tuple[list[str], float]]:
            return [([c.name], float(v(c))) for c in cs]

        def per_job(key: str) -> list[tuple[list[str], float]]:
            return [([str(j["id"]), str(j["kind"])], float(j[key]))  # type: ignore[arg-type]
                    for j in running if j.get(key) is not None]

        return [
            ("virtfs_container_size_bytes", "Container size", ["container"],
             per_container(lambda c: c.size)),
            ("virtfs_container_used_bytes", "Bytes of the container disks use", ["container"],
             per_container(lambda c: c.used)),
            ("virtfs_container_free_bytes", "Free bytes of the container", ["container"],
             per_container(lambda c: c.space.free)),
            ("virtfs_container_failed", "1 if the container is failed", ["container"],
             per_container(lambda c: c.failed)),
            ("virtfs_disk_size_bytes", "Disk size", ["disk"],
             [([d.name], float(d.size)) for d in disks]),
            ("virtfs_disk_allocated_bytes", "Bytes of the disk backed by storage", ["disk"],
             [([d.name], float(d.allocated)) for d in disks]),
            ("virtfs_job_total_bytes", "Bytes a running job moves", ["job", "kind"],
             per_job("total")),
            ("virtfs_job_done_bytes", "Bytes a running job has moved", ["job", "kind"],
             per_job("done")),
            ("virtfs_copier_published_bytes", "Bytes of moving segments the copier made "
             "writable at the new location for every agent, since this controller started",
             [], [([], float(svc.movement.copier.published_bytes))]),
            ("virtfs_agents_connected", "Agents connected now", [],
             [([], float(sum(a.connected for a in agents)))]),
            ("virtfs_agent_lease_remaining_seconds", "Seconds left on each agent's lease",
             ["agent", "host", "mount"],
             [([str(a.id), a.host, a.mount], max(0.0, a.lease_until - now)) for a in agents]),
        ]

    async def run(self) -> None:
        """Refresh the gauges every metrics_http.REFRESH seconds, forever."""
        while True:
            self.snapshot.refresh()
            await trio.sleep(REFRESH)
