"""The packages import one way (docs/design/layering.md):

    hybridflow (runtime)  ←  hybridflow.trainer  ←  hybridflow.workers  ←  recipes, examples, benchmarks

The runtime imports neither the trainer nor the workers; the trainer (algorithm pieces, settings,
the controller's loop) never imports the workers, so the controller code reaches the workers only
through worker groups. (The ``hybridflow`` command, trainer/main.py, finds the recipes it runs as
package data of ``hybridflow.recipes``.) Every import statement counts, those inside functions too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# folder in the repository -> the package it is installed as (setup.py package_dir)
PACKAGES = {"hybridflow": "hybridflow", "trainer": "hybridflow.trainer", "workers": "hybridflow.workers"}
# package -> the packages it must never import
FORBIDDEN = {"hybridflow": ("hybridflow.trainer", "hybridflow.workers", "hybridflow.recipes"),
             "hybridflow.trainer": ("hybridflow.workers",),
             "hybridflow.workers": ("hybridflow.recipes",)}


def module_name(folder: str, path: Path) -> str:
    parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGES[folder], *parts])


def imports(path: Path, module: str) -> list[tuple[int, str]]:
    """``(line, imported module)`` of every import in the file, relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return found


def sources():
    for folder in PACKAGES:
        for path in sorted((REPO / folder).rglob("*.py")):
            yield folder, path


def owner(module: str) -> str:
    """The layer a module belongs to: the longest package of PACKAGES it is in."""
    return max((p for p in FORBIDDEN if module == p or module.startswith(p + ".")), key=len)


def test_imports_go_one_way():
    wrong = []
    for folder, path in sources():
        module = module_name(folder, path)
        layer = owner(module)
        for line, target in imports(path, module):
            if any(target == f or target.startswith(f + ".") for f in FORBIDDEN[layer]):
                wrong.append(f"{path.relative_to(REPO)}:{line} ({layer}) imports {target}")
    assert not wrong, "imports against the layering (docs/design/layering.md):\n" + "\n".join(wrong)


@pytest.mark.parametrize("source, target", [
    ("from hybridflow.workers.roles.actor import ActorWorker", "hybridflow.workers.roles.actor"),
    ("from ..workers import build_workers", "hybridflow.workers"),
    ("import hybridflow.workers.rollout as r", "hybridflow.workers.rollout"),
])
def test_the_walk_sees_every_kind_of_import(tmp_path, source, target):
    """The check can fail: absolute, relative and function-level imports are all found."""
    path = tmp_path / "trainer" / "probe.py"
    path.parent.mkdir()
    path.write_text(f"def f():\n    {source}\n")
    found = [t for _, t in imports(path, "hybridflow.trainer.probe")]
    assert any(t == target or t.startswith(target + ".") for t in found), found
    assert owner("hybridflow.trainer.probe") == "hybridflow.trainer"
