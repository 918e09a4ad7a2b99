"""python -m bench.run [SECTION ...] [--quick] [--json FILE]: run benchmark sections.

A section is a module with ``TITLE`` and ``run(report, section)``; register it
in ``SECTIONS``. With no SECTION, every registered section runs. Temporary
files go under ``$TMPDIR`` (default /tmp) and are removed afterwards.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from collections.abc import Sequence

from .report import Report, Section

# name -> module; imported only when the section runs, so one section's
# dependencies (pyfuse3, a FUSE device) never stop another from running.
SECTIONS: dict[str, str] = {
    "controller": "bench.controller",
    "datapath": "bench.datapath",
    "agent_table": "bench.agent_table",
    "movement": "bench.movement",
    "imports": "bench.imports",
    "snapshots": "bench.snapshots",
    "diff": "bench.diff",
    "journal_group": "bench.journalgroup",
    "failover": "bench.failover",
    "group_ops": "bench.groupops",
    "standby_lag": "bench.standbylag",
    "failover_scale": "bench.failoverscale",
}


def _meta(quick: bool) -> dict[str, object]:
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "tmpdir": os.environ.get("TMPDIR", "/tmp"),
        "quick": quick,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="virtfs benchmarks: figures (and the issue's aims) to stdout, "
        "progress to stderr.",
    )
    p.add_argument("sections", nargs="*", metavar="SECTION",
                   help=f"sections to run: {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="smaller sizes and shorter runs (a smoke test; aims are scaled "
                   "where a figure depends on size)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    args = p.parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    names = args.sections or list(SECTIONS)

    report = Report(quick=args.quick, meta=_meta(args.quick))
    print(f"virtfs benchmark ({'quick' if args.quick else 'full'}): {', '.join(names)} on "
          f"{report.meta['cpus']} CPUs, Python {report.meta['python']}, load average "
          f"{' '.join(map(str, report.meta['loadavg_start']))} (other work on the machine "
          "skews wall times)")
    print("vs aim: measured against the issue's aim, on the aim's good side "
          "(>1.00x = better than the aim)\n", flush=True)
    t_all = time.perf_counter()
    for name in names:
        module = importlib.import_module(SECTIONS[name])
        section = Section(name)
        report.sections.append(section)
        t0 = time.perf_counter()
        report.progress(f"section {name}: {module.TITLE}")
        module.run(report, section)
        section.seconds = time.perf_counter() - t0
    total = time.perf_counter() - t_all
    report.meta["seconds"] = round(total, 3)
    report.meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"total {total:.1f} s, load average at the end "
          f"{' '.join(map(str, report.meta['loadavg_end']))}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_json(), f, indent=2)
            f.write("\n")
        report.progress(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
