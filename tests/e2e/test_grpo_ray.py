"""GRPO with the Ray executor over 2 ranks (data parallel): the same recipe runs unchanged, logs
the DESIGN.md metrics contract every step, and draws the reward curve."""
from __future__ import annotations

import pytest

from hybridflow.config import parse_cli
from hybridflow.trainer.rewards import RewardError

from .conftest import RECIPES, read_rows, run_recipe, train_rows

pytestmark = pytest.mark.ray

CONTRACT = ("step", "reward/mean", "response_length/mean", "timing/step_s", "throughput/tokens_per_s")
# no old_log_prob stage: one optimizer step per batch, so π_old comes from the update (actor.old_log_prob=auto)
GRPO_STAGES = ("gen", "reward", "ref", "adv", "update_actor")


def test_grpo_ray_two_ranks(assets, tmp_path, ray_e2e, runs):
    run = run_recipe("grpo", assets.args(tmp_path, "executor=ray", "world_size=2", "num_cpus_per_worker=0.5",
                                         "trainer.steps=3", assets.reward("parity")))
    assert run.step == 3
    assert {g.world_size for g in run.groups.values()} == {2}
    assert len(set(run.groups["actor"]._handle.pids())) == 2  # one process per rank, roles colocated in it

    rows = train_rows(tmp_path)
    assert sorted(rows) == [1, 2, 3]
    for step, row in rows.items():
        missing = [k for k in CONTRACT + tuple(f"timing/{s}_s" for s in GRPO_STAGES) if k not in row]
        assert not missing, f"step {step}: metrics.jsonl lacks {missing}"
        assert row["step"] == step
        assert row["timing/step_s"] > 0 and row["throughput/tokens_per_s"] > 0
        assert 0.0 <= row["reward/mean"] <= 1.0
        assert row["reward/num_failed"] == 0
        assert 0 < row["response_length/mean"] <= 4
        # both ranks' rows came back: 8 prompts x 4 samples
        assert row["throughput/total_tokens"] >= 8 * 4 * (row["prompt_length/mean"] + row["response_length/mean"]) - 1e-6
        assert row["actor/grad_norm"] > 0
        assert row["actor/old_log_prob_from_update"] == 1.0 and "timing/old_log_prob_s" not in row
    assert [r["step"] for r in read_rows(tmp_path)] == [0, 1, 2, 3, 3]  # val at 0, 2 (in step 2's row), final at 3
    assert "val/reward/mean" in read_rows(tmp_path)[-1]
    assert (tmp_path / "reward_curve.png").stat().st_size > 0


def test_grpo_ray_worker_reward_error_reaches_the_controller(assets, tmp_path, ray_e2e, runs):
    """A reward function raising on a rank (reward.strict) fails the run in the controller with
    the original error type, the function, the sample and the rank; no hang."""
    with pytest.raises(RewardError) as info:
        run_recipe("grpo", assets.args(tmp_path, "executor=ray", "world_size=2", "num_cpus_per_worker=0.5",
                                       "trainer.val_before_train=false", assets.reward("flaky"), "reward.strict=true"))
    text = str(info.value) + "\n".join(getattr(info.value, "__notes__", []))
    assert "flaky" in text and "prompt=" in text and "flaky cannot score first operand" in text
    assert "rank" in text
    assert len(runs) == 1 and runs[0].step == 1


@pytest.mark.parametrize("recipe", ["grpo", "ppo", "sft"])
def test_fractional_cpus_per_worker_override(recipe):
    """Ray takes fractional CPUs (several small ranks on one core): the CLI must accept them."""
    cfg = parse_cli(["num_cpus_per_worker=0.5"], str(RECIPES / f"{recipe}.yaml"))
    assert cfg.num_cpus_per_worker == 0.5
