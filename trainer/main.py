"""The ``hybridflow`` command: run a recipe from an installed package, no checkout needed.

    hybridflow list                               the recipes, one line each
    hybridflow config RECIPE                      the recipe's default config (merged YAML)
    hybridflow RECIPE [--config FILE] [key=value ...]
                                                  run it: the same as python recipes/RECIPE.py ...

A recipe is a ``<name>.py`` with a ``main(argv)`` in the ``hybridflow.recipes`` package (the
repository's recipes/ folder); ``python -m hybridflow.trainer.main`` is the same command.
"""
from __future__ import annotations

import os
import runpy
import sys

USAGE = ("usage: hybridflow list | hybridflow config RECIPE | "
         "hybridflow RECIPE [--config FILE] [key=value ...]")


def recipes_dir() -> str:
    import hybridflow.recipes

    return os.path.dirname(os.path.abspath(hybridflow.recipes.__file__))


def recipes() -> dict[str, str]:
    """``{name: its docstring's first paragraph, up to 100 characters}`` of every recipe script."""
    import ast
    import textwrap

    found = {}
    for file in sorted(os.listdir(recipes_dir())):
        if file.endswith(".py") and not file.startswith("_"):
            with open(os.path.join(recipes_dir(), file)) as f:
                doc = ast.get_docstring(ast.parse(f.read())) or ""
            found[file[:-3]] = textwrap.shorten(" ".join(doc.split("\n\n")[0].split()), 100, placeholder=" …")
    return found


def _recipe_path(name: str, ext: str = ".py") -> str:
    path = os.path.join(recipes_dir(), name + ext)
    if not os.path.isfile(os.path.join(recipes_dir(), name + ".py")) or name.startswith("_"):
        raise SystemExit(f"hybridflow: no recipe {name!r}; recipes: {', '.join(recipes())}\n{USAGE}")
    if not os.path.isfile(path):
        raise SystemExit(f"hybridflow: recipe {name!r} has no config of its own ({name}{ext}); "
                         f"its overrides go to the recipes it runs")
    return path


def main(argv: list[str] | None = None) -> int:
    """The console script: :func:`run` on ``argv`` (default ``sys.argv[1:]``); exit status 0, or
    2 with one line naming the cause for a bad config (a recipe's ``ConfigError``)."""
    from hybridflow.config import ConfigError

    try:
        run(sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        print(f"hybridflow: {err}", file=sys.stderr)
        return 2
    return 0


def run(argv: list[str]):
    """Dispatch ``argv``; returns what the recipe's ``main`` returns (its RLRun), else None."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.split("\n\n")[1] if argv else USAGE)
        return None
    command, rest = argv[0], argv[1:]
    if command == "list":
        for name, line in recipes().items():
            print(f"{name:14s} {line}")
        return None
    if command == "config":
        if len(rest) != 1:
            raise SystemExit(f"hybridflow config: name one recipe\n{USAGE}")
        from omegaconf import OmegaConf

        from hybridflow.config import load_config

        print(OmegaConf.to_yaml(load_config(_recipe_path(rest[0], ".yaml"))), end="")
        return None
    return runpy.run_path(_recipe_path(command))["main"](rest)


if __name__ == "__main__":
    sys.exit(main())
