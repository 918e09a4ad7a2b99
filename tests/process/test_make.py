"""The Makefile and .ci/run take another interpreter: `make test PY=python3.13` builds and
uses a venv of its own, beside the default .venv (issue 17: Debian 13's Python 3.13)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def make_n(*args: str) -> str:
    """What `make -n` would run (nothing is run; -B so nothing counts as done)."""
    p = subprocess.run(["make", "-n", "-B", "-C", str(ROOT), *args], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_make_test_with_another_interpreter_uses_its_own_venv():
    py = sys.executable  # any interpreter: a path, as `PY=/usr/bin/python3.13` would be
    name = Path(py).name
    out = make_n("test", f"PY={py}")
    assert f"{py} -m venv .venv-{name}" in out
    assert f".venv-{name}/bin/pip install -q -e '.[test]'" in out
    assert f".venv-{name}/bin/pytest -q" in out
    assert f"PY={py} bash scripts/sysdeps.sh" in out
    default = make_n("test")
    assert "python3 -m venv .venv\n" in default and ".venv/bin/pytest -q" in default


def test_ci_run_names_the_interpreter_and_refuses_a_missing_one():
    p = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "no-such-python3.99"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "no interpreter 'no-such-python3.99'" in p.stderr, p.stderr
