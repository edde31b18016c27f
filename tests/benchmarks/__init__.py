"""Smoke tests of the benchmark harnesses (no timing assertions: numbers depend on the machine)."""
import math


def positive(value) -> bool:
    """A finite number above 0 (not a bool): what every measured time, rate and size must be."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
