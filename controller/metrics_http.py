"""Prometheus metrics over HTTP for both daemons (docs/metrics.md), with prometheus-client.

``serve`` starts prometheus-client's own HTTP server (a thread) on ``--metrics
HOST:PORT``. Counters and histograms are updated where things happen (they are
thread-safe). Figures read off the tables or the session (sizes, leases, debts)
are gauges built in the event loop once a second (``Snapshot.refresh``) and
handed to the HTTP thread by one reference swap, so a scrape never walks
structures the loop is changing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REFRESH = 1.0  # seconds between snapshots of the gauges

# seconds: a 4 KiB request (tens of µs) up to a fault that waited for a copy (seconds)
LATENCY_BUCKETS = (2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
                   5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def parse_addr(addr: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 in brackets: [::1]:9100; PORT 0: any free port). ValueError."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--metrics {addr!r}: expected HOST:PORT, e.g. 127.0.0.1:9100")
    return host.strip("[]"), int(port)


def new_registry() -> CollectorRegistry:
    """A registry with the process's own figures (CPU seconds, memory, open fds)."""
    r = CollectorRegistry()
    ProcessCollector(registry=r)
    PlatformCollector(registry=r)
    return r


def serve(addr: str, registry: CollectorRegistry) -> tuple[str, int]:
    """Serve registry at http://addr/metrics (a daemon thread); the (host, port) bound.
    ValueError for a bad addr; OSError if it cannot bind."""
    host, port = parse_addr(addr)
    server, _thread = start_http_server(port, host, registry=registry)
    return host, int(server.server_port)


Gauges = list[tuple[str, str, list[str], Iterable[tuple[list[str], float]]]]


class Snapshot(Collector):
    """Gauges computed in the event loop, read by the HTTP thread.

    build: called in the loop by refresh(); returns (name, help, label names,
    [(label values, value)]) per gauge.
    """

    def __init__(self, build: Callable[[], Gauges]):
        self.build = build
        self._families: list[GaugeMetricFamily] = []

    def refresh(self) -> None:
        """Rebuild the gauges (in the event loop) and publish them in one swap."""
        families = []
        for name, doc, labels, samples in self.build():
            g = GaugeMetricFamily(name, doc, labels=labels)
            for values, v in samples:
                g.add_metric(values, v)
            families.append(g)
        self._families = families

    def collect(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families)
