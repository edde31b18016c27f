"""The ``hybridflow`` command: run a recipe from an installed package, no checkout needed.

    hybridflow list                               the recipes, one line each
    hybridflow config RECIPE                      the recipe's default config (merged YAML)
    hybridflow RECIPE [--config FILE] [key=value ...]
                                                  run it: the same as python recipes/RECIPE.py ...

A recipe is a ``<name>.py`` with a ``main(argv)`` in the ``hybridflow.recipes`` package (the
repository's recipes/ folder), or a ``<name>.yaml`` without a script of its own: a variant of the
dataflow whose YAML it starts from (``gspo.yaml``: ``defaults: [grpo.yaml]``), run by that script
with ``--config <name>.yaml``. ``python -m hybridflow.trainer.main`` is the same command.
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


def _script(name: str) -> str | None:
    """The script that runs recipe ``name``: its own, else that of the first YAML its ``defaults``
    start from (searched depth first); None for a YAML of no recipe (base.yaml)."""
    if os.path.isfile(os.path.join(recipes_dir(), name + ".py")):
        return name
    path = os.path.join(recipes_dir(), name + ".yaml")
    if not os.path.isfile(path):
        return None
    import yaml

    with open(path) as f:
        bases = (yaml.safe_load(f) or {}).get("defaults") or []
    for base in [bases] if isinstance(bases, str) else bases:
        base = os.path.basename(str(base))
        if base.endswith(".yaml") and base[:-5] != name and (script := _script(base[:-5])):
            return script
    return None


def _first_paragraph(text: str) -> str:
    import textwrap

    return textwrap.shorten(" ".join(text.split("\n\n")[0].split()), 100, placeholder=" …")


def recipes() -> dict[str, str]:
    """``{name: one line}`` of every recipe: a script (its docstring's first paragraph) or a variant
    YAML (``(runs grpo.py)`` and its first comment line), up to 100 characters."""
    import ast

    found = {}
    for file in sorted(os.listdir(recipes_dir())):
        name, ext = os.path.splitext(file)
        if name.startswith("_") or ext not in (".py", ".yaml") or name in found:
            continue
        with open(os.path.join(recipes_dir(), file)) as f:
            text = f.read()
        if ext == ".py":
            found[name] = _first_paragraph(ast.get_docstring(ast.parse(text)) or "")
        elif not os.path.isfile(os.path.join(recipes_dir(), name + ".py")) and (script := _script(name)):
            comment = text.splitlines()[0].lstrip("# ") if text.startswith("#") else ""
            found[name] = _first_paragraph(f"(runs {script}.py) {comment}")
    return found


def _recipe_path(name: str, ext: str = ".py") -> str:
    script = _script(name) if not name.startswith("_") else None
    if script is None:
        raise SystemExit(f"hybridflow: no recipe {name!r}; recipes: {', '.join(recipes())}\n{USAGE}")
    path = os.path.join(recipes_dir(), (name if ext == ".yaml" else script) + ext)
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
    script = _recipe_path(command)
    if os.path.basename(script) != command + ".py":  # a variant: its script with its YAML
        if any(a == "--config" or a.startswith("--config=") for a in rest):
            from hybridflow.config import ConfigError

            raise ConfigError(f"hybridflow {command} already runs {os.path.basename(script)} with --config "
                              f"{command}.yaml; for a file of your own, start it from that YAML "
                              f"(defaults: [{_recipe_path(command, '.yaml')}]) and run it with "
                              f"hybridflow {os.path.basename(script)[:-3]} --config FILE")
        rest = ["--config", _recipe_path(command, ".yaml"), *rest]
    return runpy.run_path(script)["main"](rest)


if __name__ == "__main__":
    sys.exit(main())
