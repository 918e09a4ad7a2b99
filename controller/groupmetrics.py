"""A group member's own Prometheus metrics (``virtfs-controller --etcd ... --metrics``;
docs/metrics.md "Controller group", docs/ha.md).

A member serves its metrics endpoint for its whole life, leader or standby: the
registry outlives its terms. These figures are the member's: its role, the term it
sees, the journal's head, a standby's applied seq and lag, the elections it won and
its step-downs. While it leads, its service's ControllerMetrics (controller/metrics.py)
are registered beside them, and taken out when the term ends.

As with the other gauges (controller/metrics_http.py), the figures are read in the
event loop once a second (``run``) and handed to the HTTP thread in one swap.
"""

from __future__ import annotations

from collections.abc import Iterator

import trio
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .group import Member
from .metrics_http import REFRESH

ROLES = ("leader", "standby")


class GroupMetrics(Collector):
    """member's figures in registry (registered here), refreshed by ``run()``."""

    def __init__(self, registry: CollectorRegistry, member: Member) -> None:
        self.member = member
        self._families: list[Metric] = []
        self.refresh()
        registry.register(self)

    def figures(self) -> dict[str, float | None]:
        """What the member knows now (in the event loop): role (1.0 leads), term
        (token; 0 with no leader known), head (the journal head's seq: the leader's
        durable seq, or the newest head a standby has seen; None before any), applied
        and lag (a standby's seq and head less it; None while leading)."""
        m = self.member
        leads = m.role == "leader"
        if m.term is not None:
            term = m.term.term.token
        else:
            term = m.leader.token if m.leader is not None else 0
        hot = m.hot if not leads else None
        head: int | None = None
        if leads and m.durable_seq is not None:
            head = m.durable_seq()
        elif hot is not None and hot.head is not None:
            head = hot.head.seq
        applied = float(hot.seq) if hot is not None else None
        lag = (max(0, head - hot.seq) if head is not None else 0) if hot is not None else None
        return {"leader": 1.0 if leads else 0.0, "term": float(term),
                "head": None if head is None else float(head), "applied": applied,
                "lag": None if lag is None else float(lag)}

    def refresh(self) -> None:
        """Rebuild the families (in the event loop) and publish them in one swap."""
        f = self.figures()
        m = self.member
        role = GaugeMetricFamily("virtfs_group_role", "1 for the role this member has "
                                 "now (leader or standby), 0 for the other", labels=["role"])
        for r in ROLES:
            role.add_metric([r], float((f["leader"] == 1.0) == (r == "leader")))
        out: list[Metric] = [
            role,
            GaugeMetricFamily("virtfs_group_term", "The term (token) of the group's "
                              "leader as this member sees it; 0 with no leader known",
                              value=f["term"]),
        ]
        for key, name, doc in (
                ("head", "virtfs_group_journal_head_seq", "The journal's durable head "
                 "(seq): the leader's, or the newest a standby has seen"),
                ("applied", "virtfs_group_standby_applied_seq", "The last record a "
                 "standby has applied (absent while it leads)"),
                ("lag", "virtfs_group_standby_lag_records", "Records a standby is "
                 "behind the head it has seen (absent while it leads)")):
            g = GaugeMetricFamily(name, doc)
            if f[key] is not None:
                g.add_metric([], f[key])  # type: ignore[arg-type]
            out.append(g)
        out.append(CounterMetricFamily("virtfs_group_elections_won", "Terms this member "
                                       "has won and led", value=m.elections_won))
        out.append(CounterMetricFamily("virtfs_group_step_downs", "Terms of this member "
                                       "that ended (lost, fenced or handed over)",
                                       value=m.step_downs))
        self._families = out

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)

    async def run(self) -> None:
        """Refresh every metrics_http.REFRESH seconds, for ever."""
        while True:
            self.refresh()
            await trio.sleep(REFRESH)
