"""Command-line pieces every harness shares: ``key=value`` overrides after the options, lists of
names (``--backends``, ``--variants``), the machine facts recorded with each report, and the JSON
file ``--out``."""
from __future__ import annotations

import argparse
import json
import os
import platform

import torch


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str], what: str = "key=value") -> tuple:
    """``(options, overrides)``: the parser's options, and every other argument, each of which
    must be ``key=value`` (anything else is a usage error naming it)."""
    args, rest = parser.parse_known_args(argv)
    bad = [item for item in rest if "=" not in item or item.startswith("-")]
    if bad:
        parser.error(f"unrecognised arguments {bad}: use --options or {what} overrides")
    return args, rest


def names_from(value: str, known, option: str) -> list[str]:
    """The comma-separated names of ``value`` (an option such as ``--backends``); an empty list or
    a name not in ``known`` exits with a message naming it and the choices."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in names if v not in known]
    if unknown or not names:
        raise SystemExit(f"{option}: unknown {unknown or names}; available: {', '.join(known)}")
    return names


def machine_meta(loadavg_before: float) -> dict:
    """Versions, CPU count, torch threads, platform and the 1-minute load average before/now."""
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "loadavg_1m_before": loadavg_before, "loadavg_1m_after": os.getloadavg()[0]}


def write_report(report: dict, path: str | None) -> None:
    """Write ``report`` as indented JSON to ``path`` (nothing if None) and say so."""
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {path}")
