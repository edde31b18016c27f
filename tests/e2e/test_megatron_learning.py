"""GRPO learns the quick start's task with the megatron actor (tp=2) on the Ray executor.

Two ranks form one tensor-parallel group (dp = 1): both get every prompt, TP rank 0 answers.
Actor and reference are megatron engines colocated in one process per rank; generation runs the
hf rollout on the gathered full weights (workers/engines/megatron.py ``generation_context``).
Same bar as tests/e2e/test_learning.py's Ray GRPO case."""
import json
import os
import runpy

import pytest

pytestmark = [pytest.mark.megatron, pytest.mark.ray]
RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")


def test_grpo_megatron_tp2_learns(warmed, ray_e2e, runs, tmp_path):
    main = runpy.run_path(os.path.join(RECIPES, "grpo.py"))["main"]
    run = main([*warmed, "executor=ray", "world_size=2", "num_cpus_per_worker=0.5", "actor.backend=megatron",
                "actor.megatron.tp=2", "trainer.steps=30", f"trainer.run_dir={tmp_path}", "trainer.val_every=0",
                "trainer.val_before_train=false"])
    rows = [json.loads(line) for line in open(os.path.join(run.run_dir, "metrics.jsonl"))]
    rewards = [r["reward/mean"] for r in rows if "reward/mean" in r]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"megatron tp=2 GRPO: reward first 5 {first:.3f} → last 5 {last:.3f}")
    assert len(rewards) == 30
    assert last - first >= 0.08, f"reward {first:.3f} → {last:.3f}, wanted +0.08"
    assert all(r["actor/grad_norm"] > 0 for r in rows if "actor/grad_norm" in r)
