"""vdctl's progress bars: tqdm, with byte counts and rates in the project's units.

tqdm's own unit_scale mixes bases (counts in powers of 1024 labelled "MB", rates in
powers of 1000), so the bar prints fields computed by units.format_size and
units.format_rate instead (tqdm passes a bar's format_dict to bar_format).
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

from .units import format_rate, format_size

BAR_FORMAT = "{l_bar}{bar}| {done_h}/{total_h} [{elapsed}<{remaining}, {rate_h}]"


class SizeBar(tqdm):  # type: ignore[type-arg]
    """A tqdm bar over bytes: "42%|####  | 1.5G/3.5G [00:10<00:14, 150M/s]"."""

    @property
    def format_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = super().format_dict
        n, total, elapsed = d["n"], d["total"], d["elapsed"]
        rate = d["rate"] if d["rate"] is not None else (n / elapsed if elapsed else None)
        d["done_h"] = format_size(int(n))
        d["total_h"] = format_size(int(total)) if total else "?"
        d["rate_h"] = format_rate(rate) if rate else "?/s"
        return d


def size_bar(total: int, desc: str) -> SizeBar:
    """A progress bar on stderr for total bytes (hidden when stderr is not a terminal)."""
    return SizeBar(total=total, desc=desc, file=sys.stderr, disable=None, leave=True,
                   bar_format=BAR_FORMAT)
