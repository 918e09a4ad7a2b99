"""Figures, workloads and sections: the benchmark's result model, its table and its JSON.

A figure may carry an aim (``> 5000`` ops/s, ``< 5`` s). The ``vs aim`` column
is the ratio on the aim's good side: measured/target for a "more is better"
aim, target/measured for a "less is better" one, so above 1.00x is better
than the aim and below it is short of it, by that factor.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TextIO


class Aim(NamedTuple):
    op: str  # ">" (more is better) or "<" (less is better)
    target: float

    def ratio(self, value: float) -> float:
        if self.op == ">":
            return value / self.target if self.target else math.inf
        return self.target / value if value else math.inf

    def describe(self) -> str:
        return f"{self.op} {fmt(self.target)}"


def more_than(target: float) -> Aim:
    return Aim(">", target)


def less_than(target: float) -> Aim:
    return Aim("<", target)


def fmt(value: float | int | str | None) -> str:
    """A number for a person: thousands separators, about three significant digits."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if math.isinf(value) or math.isnan(value):
        return str(value)
    a = abs(value)
    if a >= 1000:
        return f"{value:,.0f}"
    if a >= 100:
        return f"{value:.0f}"
    if a >= 10:
        return f"{value:.1f}"
    if a >= 1:
        return f"{value:.2f}"
    if a == 0:
        return "0"
    return f"{value:.3g}"


@dataclass
class Figure:
    name: str
    value: float | int | str | None
    unit: str = ""
    aim: Aim | None = None

    def ratio(self) -> float | None:
        if self.aim is None or not isinstance(self.value, int | float):
            return None
        return self.aim.ratio(float(self.value))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "value": self.value, "unit": self.unit}
        if self.aim is not None:
            r = self.ratio()
            out["aim"] = {"op": self.aim.op, "target": self.aim.target}
            out["vs_aim"] = None if r is None or math.isinf(r) else round(r, 4)
        return out


@dataclass
class Workload:
    key: str
    title: str
    params: dict[str, Any] = field(default_factory=dict)
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # wall time the workload took, set-up included
    table: str | None = None  # a preformatted table printed instead of the metric rows

    def add(self, name: str, value: float | int | str | None, unit: str = "",
            aim: Aim | None = None) -> Figure:
        f = Figure(name, value, unit, aim)
        self.figures.append(f)
        return f

    def note(self, text: str) -> None:
        self.notes.append(text)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "title": self.title, "params": self.params,
                "figures": [f.to_json() for f in self.figures], "notes": self.notes,
                "seconds": round(self.seconds, 3)}

    def render(self) -> str:
        head = ["metric", "value", "unit", "aim", "vs aim"]
        rows = []
        for f in self.figures:
            r = f.ratio()
            rows.append([f.name, fmt(f.value), f.unit,
                         f.aim.describe() if f.aim else "",
                         "" if r is None else f"{r:.2f}x"])
        widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
        align = ["<", ">", "<", "<", ">"]

        def line(cells: list[str]) -> str:
            return "  " + "  ".join(f"{c:{a}{w}}" for c, a, w in
                                    zip(cells, align, widths, strict=True)).rstrip()

        out = [f"== {self.key}: {self.title}  ({self.seconds:.1f} s)"]
        if self.params:
            out.append("  " + ", ".join(f"{k}={fmt(v) if not isinstance(v, str) else v}"
                                        for k, v in self.params.items()))
        if self.table is not None:
            out.append(self.table)
        if self.table is None or rows:  # the figures too: the table may not show the aims
            out.append(line(head))
            out.append(line(["-" * w for w in widths]))
            out.extend(line(r) for r in rows)
        out.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(out)


@dataclass
class Section:
    name: str
    workloads: list[Workload] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 3),
                "workloads": [w.to_json() for w in self.workloads]}


@dataclass
class Report:
    quick: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    sections: list[Section] = field(default_factory=list)
    out: TextIO = sys.stdout
    err: TextIO = sys.stderr

    def progress(self, msg: str) -> None:
        print(f"bench: {msg}", file=self.err, flush=True)

    def emit(self, w: Workload) -> None:
        """Print a finished workload's table at once, so a long run shows results as it goes."""
        print(w.render() + "\n", file=self.out, flush=True)

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "quick": self.quick,
                "sections": {s.name: s.to_json() for s in self.sections}}


# ---------------------------------------------------------------- helpers for sections


def percentile(sorted_vals: Sequence[float], p: float) -> float:
    """The p-th percentile (nearest rank) of ascending values; nan if there are none."""
    if not sorted_vals:
        return float("nan")
    k = min(len(sorted_vals) - 1, max(0, int(round(p / 100 * len(sorted_vals) + 0.5)) - 1))
    return float(sorted_vals[k])


def spread(vals: Sequence[float]) -> str:
    """'median (min-max)' of repeated measurements, for a person."""
    if not vals:
        return "-"
    if len(vals) == 1:
        return fmt(vals[0])
    return f"{fmt(statistics.median(vals))} ({fmt(min(vals))}-{fmt(max(vals))})"


def text_table(rows: list[list[str]], align: str) -> str:
    """rows (the first is the heading) as aligned text; align: one of '<>' per column."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  " + "  ".join(f"{c:{a}{w}}" for c, a, w in
                                      zip(r, align, widths, strict=True)).rstrip())
        if k == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
