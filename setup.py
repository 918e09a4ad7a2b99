"""virtfs's setuptools shim: its dependencies, with the patched pyfuse3 named by path.

Everything else is in pyproject.toml. The dependency list lives here because virtfs needs the
pyfuse3 built from ``third_party/pyfuse3`` (upstream's sdist with the fallocate and lseek
patches: third_party/pyfuse3/README.md), and a PEP 508 direct reference must be an absolute
``file:`` URL, which only code that knows where this tree lies can write. So ``pip install .``,
``pip install -e .`` and ``pipx install .`` from a clone build and install that pyfuse3, never
the unpatched one from PyPI. It also builds ``virtfs/_fastio.c`` (the C fast path of
reads, virtfs/cfast.py) as an optional extension.
"""

from pathlib import Path

from setuptools import Extension, setup

PYFUSE3 = (Path(__file__).resolve().parent / "third_party" / "pyfuse3").as_uri()

setup(install_requires=[
    "trio>=0.25",
    "msgpack>=1.0",
    f"pyfuse3 @ {PYFUSE3}",  # 3.5.0+virtfs.fallocate.lseek.fastpath
    "tqdm>=4.60",  # vdctl's progress bars (migrate, drain)
    "prometheus-client>=0.17",  # --metrics (start_http_server returns the server)
    "httpx>=0.27",  # etcd's v3 JSON gateway (controller/etcd.py, docs/ha.md)
], ext_modules=[
    # the C fast path of FUSE reads (virtfs/cfast.py); optional: if it cannot be built, the
    # install goes on and the agent runs its Python path (it says so once at mount)
    Extension("virtfs._fastio", ["virtfs/_fastio.c"], optional=True,
              extra_compile_args=["-O2", "-Wall"]),
])
