"""The README's tour, run as written (issue 17 item 8: its figures were wrong once,
64 vs 128 MiB mapped): `make run`'s mount (an embedded controller, --demo), then the
tour's first commands through bash in a directory laid out as `make run` lays it
out (./mnt, ./state), and the figures its comments give checked against what the
commands show."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from rig import BIN, run_vdctl

README = Path(__file__).resolve().parents[2] / "README.md"
MiB, GiB = 1 << 20, 1 << 30


def tour() -> list[str]:
    """The tour's commands up to its ext4 part, one a line, comments kept."""
    text = README.read_text()
    block = text.split("## A tour", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    return block.split("\n# an ext4", 1)[0].strip().splitlines()


def comment(lines: list[str], command: str) -> str:
    """The comment on the tour's line that starts with command."""
    line = next(ln for ln in lines if ln.startswith(command))
    return line.split("#", 1)[1].strip()


def test_readme_tour_figures(mount_factory, tmp_path):
    lines = tour()
    make = README.read_text().split("make run    #", 1)[1].split("make test", 1)[0]
    container_gib, demo_gib = (int(x) for x in re.search(
        r"a sparse (\d+) GiB default container and a (\d+) GiB thin disk", make).groups())
    m = mount_factory("mnt", args=["--demo"])  # make run: virtfs-mount mnt --demo
    assert m.path == tmp_path / "mnt"

    # ls -l mnt: "demo: a 1 GiB file, 0 blocks used"
    size_gib, blocks = (int(x) for x in re.fullmatch(
        r"demo: a (\d+) GiB file, (\d+) blocks used", comment(lines, "ls -l mnt")).groups())
    assert size_gib == demo_gib
    st = os.stat(m.path / "demo")
    assert (st.st_size, st.st_blocks) == (size_gib * GiB, blocks)

    # the commands as written, in bash, from the directory make run works in
    script = "set -e\n" + "\n".join(lines) + "\n"
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("VIRTFS_CONTROLLER", None)
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout + r.stderr

    # dd ... bs=1M count=64, then: "128 MiB mapped: the 64 written and 64 allocated
    # ahead; the rest zero" (a sequential writer allocates ahead: README)
    dd = next(ln for ln in lines if ln.startswith("dd "))
    count = int(re.search(r"\bcount=(\d+)", dd).group(1))
    assert re.search(r"\bbs=1M\b", dd)
    mapped_mib, written, ahead = (int(x) for x in re.fullmatch(
        r"(\d+) MiB mapped: the (\d+) written and (\d+) allocated ahead; the rest zero",
        comment(lines, "vdctl disk map demo")).groups())
    assert written == count and mapped_mib == written + ahead
    state = str(tmp_path / "state")
    rows = run_vdctl("--state-dir", state, "disk", "map", "demo", "--format",
                     "json").json()["entries"]
    data = [e for e in rows if "zero" not in e["state"]]
    zero = [e for e in rows if "zero" in e["state"]]
    assert sum(e["length"] for e in data) == mapped_mib * MiB, rows
    assert [(e["vstart"], e["length"]) for e in zero] == [
        (mapped_mib * MiB, demo_gib * GiB - mapped_mib * MiB)], rows
    # the table the tour shows says the same in its units
    assert f"{demo_gib * 1024 - mapped_mib}M" in r.stdout, r.stdout
    # vdctl container ls: the default container is the sparse 64 GiB file
    cs = run_vdctl("--state-dir", state, "container", "ls", "--format", "json").json()
    assert [(c["name"], c["size"]) for c in cs] == [("default", container_gib * GiB)]
    assert f"{container_gib}G" in r.stdout, r.stdout
