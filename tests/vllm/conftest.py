"""One vLLM engine for the whole session (start-up is 30-45 s): the GRPO run of the quick-start
task with ``rollout.backend=vllm`` (inprocess executor) is the session fixture; the other tests
use its actor worker — its FSDP2 engine and the vLLM engine synced with it — after the run.

The quick start's default tiny model has head size 16, which vLLM's CPU attention kernels do not
support (32 is the smallest), so this session warms up a 2-head variant (head size 32) of the same
model with the quick start's own SFT step. ``vllm`` is imported only by the tests (marked
``vllm``), so the main suite collects this directory without the extra.
"""
from __future__ import annotations

import json
import os
import runpy
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GRPO_STEPS = 60


@pytest.fixture(scope="session")
def vllm_quickstart(tmp_path_factory) -> list[str]:
    """Overrides pointing a recipe at the warmed head-size-32 quick-start model and its data."""
    from hybridflow.trainer.tiny_model import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("vllm_quickstart")
    build_tiny_checkpoint(str(root / "base"), num_heads=2, num_kv_heads=1)  # prepare() keeps an existing base
    return runpy.run_path(str(REPO / "recipes" / "quickstart.py"))["prepare"](str(root))


@pytest.fixture(scope="session")
def vllm_run(vllm_quickstart, tmp_path_factory):
    """``(run, actor)``: a finished GRPO run with the vllm backend and its (still live) ActorWorker."""
    run_dir = tmp_path_factory.mktemp("grpo_vllm")
    main = runpy.run_path(str(REPO / "recipes" / "grpo.py"))["main"]
    run = main([*vllm_quickstart, "executor=inprocess", "rollout.backend=vllm", f"trainer.steps={GRPO_STEPS}",
                f"trainer.run_dir={run_dir}", "trainer.val_every=0", "trainer.val_before_train=false"])
    actor = run.groups["actor"]._handle.workers["actor"]
    yield run, actor
    run.close()


def metric_rows(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [r for r in rows if "reward/mean" in r]
