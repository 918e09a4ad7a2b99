"""A real etcd member per test (tests/etcdrig.py), skipped only where etcd is missing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from etcdrig import ETCD, SKIP_REASON, EtcdProc, etcd_cluster


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdProc]:
    """One etcd member on free loopback ports, data in tmp_path/etcd; killed at the end."""
    if ETCD is None:
        pytest.skip(SKIP_REASON)
    member = EtcdProc(tmp_path / "etcd", tmp_path / "etcd.log").start()
    try:
        yield member
    finally:
        member.stop()


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[list[EtcdProc]]:
    """Three members of one cluster on loopback, data under tmp_path; killed at the end."""
    if ETCD is None:
        pytest.skip(SKIP_REASON)
    members = etcd_cluster(tmp_path / "etcd3", 3)
    try:
        yield members
    finally:
        for m in members:
            m.stop()
