"""Benchmarks of hybridflow (throughput harnesses, not timed tests).

Run one as a module from the repository root, e.g. ``python -m benchmarks.runtime_overhead --quick``.
Results go to stdout (a markdown table) and, with ``--out FILE.json``, to a JSON file;
docs/benchmarks.md records the measured numbers and the exact commands.
"""
