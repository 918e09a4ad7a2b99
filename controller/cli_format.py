"""vdctl's table output: names as a shell takes them, columns, key: value lines (pure)."""

from __future__ import annotations

import shlex
import time
from typing import Any, TextIO

from .units import format_size


def shown(name: str) -> str:
    """A disk name as tables and messages print it: readable, and pasteable into a shell.

    Plain names print as they are; names with spaces or shell characters in single
    quotes (shlex.quote); names with control or other unprintable characters in bash's
    $'...' form with escapes. JSON output always gives the exact name.
    """
    if name.isprintable():
        return shlex.quote(name)
    out = []
    for c in name:
        if c == "'" or c == "\\":
            out.append("\\" + c)
        elif c.isprintable():
            out.append(c)
        else:
            code = ord(c)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
                       if code < 0x10000 else f"\\U{code:08x}")
    return "$'" + "".join(out) + "'"


def table(rows: list[list[str]], headers: list[str], out: TextIO, headings: bool = True) -> None:
    """rows as columns padded to their widest cell, under headers unless headings is False."""
    widths = [len(h) for h in headers] if headings else [0] * len(headers)
    for r in rows:
        widths = [max(w, len(x)) for w, x in zip(widths, r, strict=True)]
    if headings:
        out.write("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()
                  + "\n")
    for r in rows:
        out.write("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)).rstrip() + "\n")


def disk_shown(r: dict[str, Any]) -> str:
    """A disk's name for a table; one unlinked while open is marked (removed when the
    last agent closes it)."""
    if r.get("deleted") is not None:
        return f"{shown(r['deleted'])} (deleted, still open)"
    return shown(r["name"])


SIZE_KEYS = frozenset(("size", "used", "free", "allocated", "capacity", "segment_size",
                       "journal_bytes", "usable", "freed", "held", "old_size"))


def kv(d: dict[str, Any], out: TextIO, exact_bytes: bool = False) -> None:
    """A reply's scalar fields as "key: value" lines: names shown, times local, sizes
    (SIZE_KEYS) as "314572800 (300M)", or only the bytes with exact_bytes (vdctl
    --bytes); lists and maps are left to the caller."""
    for k, v in d.items():
        if isinstance(v, list | dict):
            continue
        if k == "name" and isinstance(v, str):
            v = shown(v)
        elif v is None:
            v = "-"
        elif isinstance(v, bool):
            v = "yes" if v else "no"
        elif k in ("ctime", "mtime", "changed", "registered", "created") and isinstance(
                v, int | float):
            v = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v))
        elif k == "uptime":
            v = f"{v} s"
        if isinstance(v, int) and not isinstance(v, bool) and k in SIZE_KEYS and (
                not exact_bytes):
            v = f"{v} ({format_size(v)})"
        out.write(f"{k + ':':<15} {v}\n")


def pct(used: int, size: int) -> str:
    """used as a percentage of size ("-" for size 0)."""
    return f"{100 * used / size:.1f}%" if size else "-"
