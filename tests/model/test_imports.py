"""The import graph (docs/architecture.md, "Source layout"): what virtfs/ may take
from controller/, and what vdctl loads.

Parsed with ast, so every import counts: inside functions and TYPE_CHECKING blocks too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# what virtfs/ may import: the client side of the protocol, and leaf modules that
# import nothing else from the controller ("controller" itself: __version__)
CLIENT_SIDE = {"controller", "controller.protocol", "controller.rows", "controller.codec",
               "controller.client",
               "controller.transport", "controller.label"}
LEAVES = {"controller.faultpoints", "controller.fsutil", "controller.units", "controller.writegate",
          "controller.statedir", "controller.metrics_http", "controller.tlsfiles",
          "controller.sdnotify"}
VIRTFS_MAY = CLIENT_SIDE | LEAVES
MOUNT_MAY = VIRTFS_MAY | {"controller.daemon"}  # the embedded controller


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def is_module(name: str) -> bool:
    p = ROOT.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def imports(path: Path, top: str = "controller") -> set[str]:
    """The modules of package top that the file at path imports (relative imports
    resolved; ``from pkg import name`` counts pkg.name if it is a module, else pkg)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            bases = [a.name for a in node.names]
            names: list[str] = []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                bases = [".".join(base + ([node.module] if node.module else []))]
            else:
                bases = [node.module or ""]
            names = [a.name for a in node.names]
        else:
            continue
        for base in bases:
            if base != top and not base.startswith(top + "."):
                continue
            subs = [f"{base}.{n}" for n in names if is_module(f"{base}.{n}")]
            if len(subs) < len(names) or not names:
                out.add(base)
            out.update(subs)
    return out


def path_of(module: str) -> Path:
    p = ROOT.joinpath(*module.split("."))
    return p / "__init__.py" if p.is_dir() else p.with_suffix(".py")


def test_virtfs_imports_only_the_client_side_of_the_controller():
    files = sorted((ROOT / "virtfs").glob("*.py"))
    assert len(files) > 5
    bad = {}
    for f in files:
        allowed = MOUNT_MAY if f.name == "mount.py" else VIRTFS_MAY
        extra = imports(f) - allowed
        if extra:
            bad[f.name] = sorted(extra)
    assert not bad, f"virtfs/ may import only {sorted(VIRTFS_MAY)} (mount.py: the daemon too)"


def test_what_virtfs_may_import_pulls_in_nothing_more():
    for m in sorted(VIRTFS_MAY):
        assert imports(path_of(m)) <= VIRTFS_MAY - {m}, m
    for m in sorted(LEAVES):
        assert imports(path_of(m)) <= {"controller"}, f"{m} is no leaf"


def test_client_does_not_import_the_server():
    assert "controller.server" not in imports(ROOT / "controller" / "client.py")
    assert imports(ROOT / "controller" / "transport.py") <= {"controller.codec",
                                                             "controller.tlsfiles"}


def test_controller_never_imports_virtfs():
    for f in sorted((ROOT / "controller").rglob("*.py")):
        assert not imports(f, top="virtfs"), f


def test_the_checker_sees_relative_and_package_imports():
    svc = imports(ROOT / "controller" / "service" / "movement.py")
    assert {"controller.faultpoints", "controller.protocol",
            "controller.service.coherence"} <= svc
    assert "controller" in imports(ROOT / "virtfs" / "mount.py")  # __version__


def test_vdctl_loads_without_the_service():
    code = ("import sys, controller.cli; "
            "print(' '.join(m for m in sys.modules if m.startswith('controller')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, check=True)
    loaded = set(r.stdout.split())
    assert "controller.cli" in loaded
    for heavy in ("controller.daemon", "controller.service", "controller.server",
                  "controller.journal"):
        assert heavy not in loaded, f"vdctl loads {heavy}"
