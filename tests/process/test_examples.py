"""The example scripts in examples/ run as documented."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("script", ["ext4_on_disk.sh", "import_export_image.sh",
                                    "two_agents.sh"])
def test_example(script):
    p = subprocess.run(["bash", str(EXAMPLES / script)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert ": OK" in p.stdout
