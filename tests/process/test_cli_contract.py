"""The command-line contract: one clear line on errors, usage errors are 2, no tracebacks."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rig import run_vdctl

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("addr", ["/tmp/x.sock", "unix:", "tcp://127.0.0.1:9999"])
def test_vdctl_bad_controller_address_is_a_usage_error(addr):
    r = run_vdctl("--controller", addr, "disk", "ls")
    assert r.rc == 2
    assert "Traceback" not in r.err


@pytest.mark.parametrize("args", [["--controller", "tcp://1.2.3.4:5"],
                                  ["--controller", "/tmp/x.sock"],
                                  ["--lease", "0"], ["--fault-timeout", "-1"],
                                  ["--read-ahead-kb", "-5"], ["--max-background", "-1"],
                                  ["--max-background", "70000"],
                                  ["--default-container-size", "0"]])
def test_mount_bad_options_are_usage_errors(tmp_path, args):
    mnt = tmp_path / "m"
    mnt.mkdir()
    p = subprocess.run([str(BIN / "virtfs-mount"), str(mnt), "--state-dir",
                        str(tmp_path / "s"), *args], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert not os.path.ismount(mnt)


def test_controller_refuses_a_state_dir_that_is_a_file(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    p = subprocess.run([str(BIN / "virtfs-controller"), "--state-dir", str(f)],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    assert "not a directory" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_vdctl_into_a_closed_pipe_is_quiet(controller, tmp_path):
    assert controller.vdctl("container", "add", "c", str(tmp_path / "c.img"), "--size",
                            "1G").rc == 0
    for i in range(40):
        assert controller.vdctl("disk", "create", f"d{i}", "--size", "1M").rc == 0
    p = subprocess.run(f"{BIN / 'vdctl'} --state-dir {controller.state_dir} disk ls "
                       "--format json | head -1", shell=True, capture_output=True, text=True,
                       timeout=30)
    assert "Traceback" not in p.stderr


def test_links_refused_and_df_inodes_sane(embedded):
    with pytest.raises(OSError) as ei:
        os.symlink("x", embedded.path / "sl")
    assert ei.value.errno == errno.EPERM
    st = os.statvfs(embedded.path)
    assert st.f_files >= st.f_ffree


def test_vdctl_resize_is_seen_at_once_in_the_mount(embedded):
    state = str(embedded.state_dir)
    assert run_vdctl("--state-dir", state, "disk", "create", "d", "--size", "1M").rc == 0
    assert os.stat(embedded.path / "d").st_size == 1 << 20
    for n in (2, 3, 4):
        assert run_vdctl("--state-dir", state, "disk", "resize", "d", f"{n}M").rc == 0
        assert os.stat(embedded.path / "d").st_size == n << 20
