"""End-to-end fixtures: a tiny random checkpoint, the addition data and a few reward functions,
built once per session in a tmp dir; helpers that call a recipe's ``main(argv)`` in-process.

Recipes are plain scripts (recipes/ is not a package), so :func:`load_recipe` executes the file
with ``runpy`` on every call: a test that monkeypatches ``hybridflow.workers.build_workers``
before calling it sees its patch used by the recipe. A variant (``gspo``: a YAML run by grpo.py)
runs as the ``hybridflow`` command runs it: its script with ``--config recipes/<name>.yaml``."""
from __future__ import annotations

import json
import os
import runpy
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.isolation import distributed_state_restored

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"

# Keys whose values depend on wall-clock time: never compared between runs.
TIME_DEPENDENT = ("timing/", "throughput/tokens_per_s")

REWARDS_PY = '''
"""Reward functions for the e2e tests (the tiny model is random, so builtin:addition is always 0)."""


def parity(prompt, response, ground_truth, **extra):
    """1.0 when the response's code points sum to an odd number: about half the samples of a
    random model, so GRPO groups have non-zero advantages and the weights really move."""
    return float(sum(map(ord, response)) % 2)


def flaky(prompt, response, ground_truth, **extra):
    """Raises on prompts whose first operand is even, else 1.0."""
    first = int(prompt.split("+")[0])
    if first % 2 == 0:
        raise ValueError(f"flaky cannot score first operand {first}")
    return 1.0


def stringly(prompt, response, ground_truth, **extra):
    """Returns a string, not a number: every sample falls back to reward.fallback_score."""
    return "1.0"
'''


@dataclass
class Assets:
    root: Path
    model: str
    train: str
    val: str
    rewards: Path

    def args(self, run_dir, *extra: str) -> list[str]:
        """The overrides every e2e run shares (small sizes), then ``extra``."""
        return [
            f"model.path={self.model}",
            f"data.train={self.train}",
            f"data.val={self.val}",
            f"trainer.run_dir={run_dir}",
            "data.batch_size=8",
            "rollout.n=4",
            "rollout.max_new_tokens=4",
            "trainer.steps=4",
            "trainer.val_every=2",
            "trainer.trackers=[jsonl]",
            *extra,
        ]

    def reward(self, name: str) -> str:
        return f"reward.function={self.rewards}:{name}"


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Assets:
    from hybridflow.trainer.tasks.arithmetic import make_addition_data
    from hybridflow.trainer.tiny_model import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("e2e")
    model = build_tiny_checkpoint(str(root / "ckpt"))
    data = make_addition_data(root / "data", n_train=256, n_val=32, n_sft=64, digits=2)
    rewards = root / "e2e_rewards.py"
    rewards.write_text(textwrap.dedent(REWARDS_PY))
    return Assets(root=root, model=model, train=data["train"], val=data["val"], rewards=rewards)


def load_recipe(name: str):
    """``main(argv)`` of recipe ``name``, freshly executed (not as ``__main__``): ``recipes/<name>.py``,
    or for a variant its script with ``--config recipes/<name>.yaml`` first."""
    from hybridflow.trainer.main import _recipe_path

    script = _recipe_path(name)
    main = runpy.run_path(script)["main"]
    if Path(script).stem == name:
        return main
    return lambda argv: main(["--config", str(RECIPES / f"{name}.yaml"), *argv])


def run_recipe(name: str, argv: list[str]):
    """Run a recipe in-process; returns its RLRun."""
    return load_recipe(name)(argv)


def read_rows(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_rows(run_dir) -> dict[int, dict]:
    """``{step: row}`` of the training steps (rows carrying ``reward/mean``)."""
    return {r["step"]: r for r in read_rows(run_dir) if "reward/mean" in r}


def comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(TIME_DEPENDENT)}


@pytest.fixture(scope="package", autouse=True)
def isolate_distributed():
    """Undo the in-process executor's rank variables and gloo group once the e2e tests are done,
    so later tests start from a clean process."""
    with distributed_state_restored():
        yield


@pytest.fixture
def no_workers(monkeypatch):
    """Make building worker groups fail loudly: config-level errors must come before it."""
    import hybridflow.workers as workers

    def refuse(*args, **kwargs):
        raise AssertionError("build_workers was called: the error should have been raised before any worker")

    monkeypatch.setattr(workers, "build_workers", refuse)


@pytest.fixture(scope="session")
def ray_e2e():
    """A local Ray instance (started once; connects to RAY_ADDRESS when set)."""
    pytest.importorskip("ray", reason="the ray extra is not installed")
    from hybridflow.executors.ray import ensure_ray

    ensure_ray()
    import ray

    yield ray


@pytest.fixture(scope="session")
def warmed(tmp_path_factory):
    """The quick start's half-trained SFT model and digit-reversal data (built once per session):
    the overrides that point a recipe at them (see recipes/quickstart.py ``prepare``)."""
    quickstart = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "quickstart.py")
    return runpy.run_path(quickstart)["prepare"](str(tmp_path_factory.mktemp("quickstart")))


@pytest.fixture
def runs(monkeypatch):
    """Every RLRun made during the test, closed afterwards (stops Ray workers), also on failure."""
    from hybridflow.trainer.run import RLRun

    made, original = [], RLRun.__init__

    def init(self, cfg):
        original(self, cfg)
        made.append(self)

    monkeypatch.setattr(RLRun, "__init__", init)
    yield made
    for run in made:
        run.close()
