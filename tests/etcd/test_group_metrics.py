"""virtfs-controller --etcd --metrics: every member's endpoint, leader or standby, for
its whole life, across a failover and handovers (docs/metrics.md, docs/ha.md); real
processes on a real etcd member."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from etcdrig import ETCD, SKIP_REASON, EtcdProc, GroupMember, started_group
from prometheus_client.parser import text_string_to_metric_families
from rig import PROC_LOGS, run_vdctl, wait_for

pytestmark = pytest.mark.skipif(ETCD is None, reason=SKIP_REASON)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class MetricsMember(GroupMember):
    """A group member with --metrics on a free port, its log checked for tracebacks."""

    def __init__(self, tmp: Path, name: str, state: Path, etcd: EtcdProc) -> None:
        super().__init__(tmp / f"{name}.sock", tmp / f"{name}.log", name, state, etcd.url,
                         ["--lease", "4", "--metrics", "127.0.0.1:0"])
        PROC_LOGS.append(self.log_path)

    def url(self) -> str:
        """The endpoint of its latest start (the log's last 'metrics at' line)."""
        found: list[str] = []
        def seen() -> bool:
            found[:] = re.findall(r"metrics at (http://\S+)",
                                  self.log().split("--- killed")[-1])
            return bool(found)
        wait_for(seen, 10, f"{self.name}'s metrics endpoint")
        return found[-1]

    def scrape(self) -> Samples:
        """Every sample of one scrape: {(name, sorted labels): value}."""
        with urllib.request.urlopen(self.url(), timeout=5) as r:
            text = r.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def names(samples: Samples) -> set[str]:
    return {n for n, _ in samples}


@pytest.fixture
def pair(tmp_path: Path, etcd: EtcdProc) -> Iterator[list[MetricsMember]]:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    with started_group([MetricsMember(tmp_path, f"c{i}", state, etcd) for i in (1, 2)]) as g:
        yield g


def vd(addrs: str, *args: str) -> object:
    r = run_vdctl("--controller", addrs, "--format", "json", *args)
    assert r.rc == 0, r.err
    return json.loads(r.out) if r.out.strip() else None


def has_disk(m: MetricsMember, disk: str) -> bool:
    return value(m.scrape(), "virtfs_disk_size_bytes", disk=disk) == 4 << 20


def role(s: Samples) -> str:
    lead = value(s, "virtfs_group_role", role="leader")
    stand = value(s, "virtfs_group_role", role="standby")
    assert {lead, stand} == {0.0, 1.0}, (lead, stand)
    return "leader" if lead == 1.0 else "standby"


def test_every_member_serves_its_metrics_across_a_failover_and_handovers(
        pair: list[MetricsMember], tmp_path: Path) -> None:
    c1, c2 = pair
    addrs = ",".join(m.addr for m in pair)
    vd(addrs, "container", "add", "c1", str(tmp_path / "c1.img"), "--size", "64M")
    for i in range(5):
        vd(addrs, "disk", "create", f"d{i}", "--size", "4M")
    head = vd(addrs, "status")["group"]["head"]  # type: ignore[index]

    def standby_at_head(m: MetricsMember, seq: int) -> bool:
        s = m.scrape()
        return (value(s, "virtfs_group_standby_applied_seq") == seq
                and value(s, "virtfs_group_journal_head_seq") == seq)

    # the figures are read once a second: wait until both show the head
    wait_for(lambda: standby_at_head(c2, head["seq"]), 10, "c2 at the head")
    wait_for(lambda: value(c1.scrape(), "virtfs_group_journal_head_seq") == head["seq"],
             5, "c1 at the head")
    s1, s2 = c1.scrape(), c2.scrape()
    assert (role(s1), role(s2)) == ("leader", "standby")
    term1 = value(s1, "virtfs_group_term")
    assert term1 == head["term"] == value(s2, "virtfs_group_term")
    assert value(s1, "virtfs_group_journal_head_seq") == head["seq"]
    assert value(s2, "virtfs_group_standby_lag_records") == 0
    assert "virtfs_group_standby_applied_seq" not in names(s1)  # only a standby's
    assert value(s1, "virtfs_group_elections_won_total") == 1
    assert value(s2, "virtfs_group_elections_won_total") == 0
    # the service's metrics while it leads, and only there (gauges: within a second)
    wait_for(lambda: has_disk(c1, "d0"), 5, "c1's disk gauge")
    assert value(s1, "virtfs_controller_ops_total", op="disk.create", code="ok") == 5
    assert "virtfs_controller_ops_total" not in names(s2)
    assert "virtfs_disk_size_bytes" not in names(s2)
    assert "process_cpu_seconds_total" in names(s2)

    c1.kill()  # a failover: c2 leads, then c1 comes back as a standby
    wait_for(c2.leads, 15, "c2 to lead")
    c1.start()
    vd(addrs, "disk", "create", "e", "--size", "4M")
    head2 = vd(addrs, "status")["group"]["head"]  # type: ignore[index]
    assert head2["term"] > term1
    wait_for(lambda: standby_at_head(c1, head2["seq"]), 10, "c1 at the head")
    s1, s2 = c1.scrape(), c2.scrape()
    assert (role(s1), role(s2)) == ("standby", "leader")
    assert value(s1, "virtfs_group_term") == value(s2, "virtfs_group_term") == head2["term"]
    assert value(s2, "virtfs_group_elections_won_total") == 1
    assert value(s2, "virtfs_group_step_downs_total") == 0
    wait_for(lambda: has_disk(c2, "e"), 5, "c2's disk gauge")
    assert "virtfs_disk_size_bytes" not in names(s1)

    # handovers: each term registers the service's metrics again, no duplicate error
    for to, old in (("c1", c2), ("c2", c1)):
        r = run_vdctl("--controller", addrs, "group", "step-down", "--to", to)
        assert r.rc == 0, r.err
        new = c1 if to == "c1" else c2
        wait_for(new.leads, 10, f"{to} to lead")
        wait_for(lambda new=new, old=old: role(new.scrape()) == "leader"
                 and role(old.scrape()) == "standby", 10, "the roles to follow")
        wait_for(lambda new=new: has_disk(new, "e"), 5, f"{to}'s disk gauge")
        assert "virtfs_disk_size_bytes" not in names(old.scrape())
    s1, s2 = c1.scrape(), c2.scrape()
    assert value(s1, "virtfs_group_elections_won_total") == 1  # since its restart
    assert value(s1, "virtfs_group_step_downs_total") == 1
    assert value(s2, "virtfs_group_elections_won_total") == 2
    assert value(s2, "virtfs_group_step_downs_total") == 1
    for m in pair:
        assert "Duplicated timeseries" not in m.log()


def test_metrics_option_is_checked_with_etcd(tmp_path: Path) -> None:
    import subprocess

    from rig import BIN
    p = subprocess.run([str(BIN / "virtfs-controller"), "--state-dir", str(tmp_path / "s"),
                        "--etcd", "http://127.0.0.1:1", "--listen", f"unix:{tmp_path}/a.sock",
                        "--metrics", "nowhere"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "expected HOST:PORT" in p.stderr.strip().splitlines()[-1]
