"""The mount against a bytearray model: random writes, reads, truncates and punches.

A hypothesis state machine drives one disk file through a real mount (small
segments, so the steps cross segment boundaries, thin gaps and partial blocks)
and checks every read, the file size and st_blocks against the model.
"""

from __future__ import annotations

import itertools
import os
import subprocess

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from rig import run_vdctl

SEG = 16 << 10  # 16 KiB segments: many segments in a small disk
MAX = 256 << 10
_names = itertools.count()


@pytest.fixture(params=["1", "0"], ids=["fast-path", "general-path"])
def model_mount(mount_factory, request):
    """The mount, with the data path's fast path on (its C readers too: the default),
    and off (VIRTFS_FASTPATH=0)."""
    m = mount_factory("mm", args=["--default-container-size", "64M"],
                      env={"VIRTFS_FASTPATH": request.param})
    m.fast = request.param == "1"
    return m


def test_mount_matches_a_bytearray_model(model_mount):
    mnt = model_mount.path
    state = str(model_mount.state_dir)

    class DiskModel(RuleBasedStateMachine):
        @initialize()
        def create(self) -> None:
            self.name = f"m{next(_names)}"
            r = run_vdctl("--state-dir", state, "disk", "create", self.name, "--size", "64K",
                          "--segment-size", str(SEG))
            assert r.rc == 0, r.err
            self.model = bytearray(64 << 10)
            self.fd = os.open(mnt / self.name, os.O_RDWR)

        def teardown(self) -> None:
            if hasattr(self, "fd"):
                os.close(self.fd)
                os.unlink(mnt / self.name)

        @rule(off=st.integers(0, MAX), data=st.binary(min_size=1, max_size=40000))
        def write(self, off: int, data: bytes) -> None:
            assert os.pwrite(self.fd, data, off) == len(data)
            end = off + len(data)
            if end > len(self.model):
                self.model.extend(bytes(end - len(self.model)))
            self.model[off:end] = data

        @rule(off=st.integers(0, MAX), n=st.integers(1, 70000))
        def read(self, off: int, n: int) -> None:
            assert os.pread(self.fd, n, off) == bytes(self.model[off : off + n])

        @rule(size=st.integers(0, MAX))
        def truncate(self, size: int) -> None:
            os.ftruncate(self.fd, size)
            if size < len(self.model):
                del self.model[size:]
            else:
                self.model.extend(bytes(size - len(self.model)))

        @rule(off=st.integers(0, MAX), n=st.integers(1, 3 * SEG))
        def punch(self, off: int, n: int) -> None:
            subprocess.run(["fallocate", "--punch-hole", "--keep-size", "-o", str(off), "-l",
                            str(n), str(mnt / self.name)], check=True)
            lo, hi = min(off, len(self.model)), min(off + n, len(self.model))
            self.model[lo:hi] = bytes(hi - lo)

        @rule()
        def fsync(self) -> None:
            os.fsync(self.fd)

        @invariant()
        def size_matches(self) -> None:
            if hasattr(self, "fd"):
                assert os.fstat(self.fd).st_size == len(self.model)

    DiskModel.TestCase.settings = settings(
        # the general path (fast path off) needs fewer: it is the path the fast one
        # falls back to on every step that is not one plain entry anyway
        max_examples=60 if model_mount.fast else 20, stateful_step_count=40, deadline=None,
        suppress_health_check=list(HealthCheck))
    DiskModel.TestCase().runTest()
    assert run_vdctl("--state-dir", state, "check").rc == 0
