"""PEP 517 build backend: pyfuse3 from its vendored upstream sdist plus virtfs's patches.

The distribution it builds is upstream pyfuse3 3.5.0 (``pyfuse3-3.5.0.tar.gz`` here, byte for
byte the PyPI sdist: its SHA-256 is checked) with ``fallocate.patch``, ``lseek.patch`` and
``fastpath.patch`` applied in that order (README.md here says what they add and why), versioned ``3.5.0+virtfs.fallocate.lseek.fastpath``
so ``pip list`` shows the patched build. Each hook unpacks and patches the sdist in a temporary
directory and hands over to upstream's own backend (``util/build_backend.py``, which configures
the Cython extension from ``pkg-config fuse3``); nothing is written into this directory.

Needs, besides the build requirements pip installs (pyproject.toml here): ``patch``, a C
compiler, ``pkg-config`` and libfuse3's headers (``scripts/sysdeps.sh`` installs them). A
missing tool or a patch that does not apply raises ``RuntimeError`` with one line saying which.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
UPSTREAM_VERSION = "3.5.0"
SDIST = HERE / f"pyfuse3-{UPSTREAM_VERSION}.tar.gz"
SDIST_SHA256 = "88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24"
PATCHES = ("fallocate.patch", "lseek.patch", "fastpath.patch")  # applied in this order
LOCAL_VERSION = f"{UPSTREAM_VERSION}+virtfs.fallocate.lseek.fastpath"


def _unpack_patched(into: Path) -> Path:
    """Unpack the sdist under ``into``, apply the patches; returns the source tree's path."""
    digest = hashlib.sha256(SDIST.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{SDIST.name}: SHA-256 {digest} is not upstream's {SDIST_SHA256}")
    with tarfile.open(SDIST) as tar:
        tar.extractall(into, filter="data")
    src = into / f"pyfuse3-{UPSTREAM_VERSION}"
    if shutil.which("patch") is None:
        raise RuntimeError("building pyfuse3 needs 'patch' (apt-get install patch)")
    for name in PATCHES:
        run = subprocess.run(["patch", "-p1", "--forward", "--batch", "--quiet",
                              "-i", str(HERE / name)], cwd=src, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"{name} does not apply to pyfuse3 {UPSTREAM_VERSION}: "
                               f"{(run.stdout + run.stderr).strip()}")
    # the sdist ships C generated from the unpatched .pyx: without it Cython must regenerate it
    # from the patched sources (and a build without Cython fails instead of compiling old code)
    (src / "src" / "pyfuse3" / "__init__.c").unlink()
    return src


@contextlib.contextmanager
def _upstream() -> Iterator[ModuleType]:
    """Upstream's backend, imported from a patched tree that is the working directory."""
    old_cwd, old_path = os.getcwd(), list(sys.path)
    old_version = os.environ.get("SETUPTOOLS_SCM_PRETEND_VERSION_FOR_PYFUSE3")
    with tempfile.TemporaryDirectory(prefix="virtfs-pyfuse3-") as tmp:
        src = _unpack_patched(Path(tmp))
        os.chdir(src)  # upstream's backend names its sources relative to the tree
        sys.path.insert(0, str(src / "util"))
        os.environ["SETUPTOOLS_SCM_PRETEND_VERSION_FOR_PYFUSE3"] = LOCAL_VERSION
        try:
            sys.modules.pop("build_backend", None)
            yield importlib.import_module("build_backend")
        finally:
            sys.modules.pop("build_backend", None)
            os.chdir(old_cwd)
            sys.path[:] = old_path
            if old_version is None:
                os.environ.pop("SETUPTOOLS_SCM_PRETEND_VERSION_FOR_PYFUSE3", None)
            else:
                os.environ["SETUPTOOLS_SCM_PRETEND_VERSION_FOR_PYFUSE3"] = old_version


def get_requires_for_build_wheel(config_settings: dict[str, object] | None = None) -> list[str]:
    """Nothing beyond pyproject.toml's ``build-system.requires`` (upstream's own list)."""
    return []


def get_requires_for_build_sdist(config_settings: dict[str, object] | None = None) -> list[str]:
    """Nothing beyond pyproject.toml's ``build-system.requires``."""
    return []


def build_wheel(wheel_directory: str, config_settings: dict[str, object] | None = None,
                metadata_directory: str | None = None) -> str:
    """Build the patched pyfuse3 wheel into ``wheel_directory``; returns its file name."""
    out = os.path.abspath(wheel_directory)
    with _upstream() as backend:
        return str(backend.build_wheel(out, config_settings, None))


def build_sdist(sdist_directory: str, config_settings: dict[str, object] | None = None) -> str:
    """An sdist of the patched tree (version ``3.5.0+virtfs...``); returns its file name."""
    out = os.path.abspath(sdist_directory)
    with _upstream() as backend:
        return str(backend.build_sdist(out, config_settings))
