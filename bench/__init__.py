"""virtfs benchmarks: ``python -m bench.run [SECTION ...] [--quick] [--json FILE]``.

Each section (``controller`` today; FUSE data-path workloads later) measures a
few workloads and reports figures, with the issue's aim next to each where it
has one. Nothing here passes or fails: the numbers are for people to read and
for ``--json`` consumers to track over time.
"""
