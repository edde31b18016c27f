"""PPO (critic + GAE + KL-penalised reward) runs end to end in-process and logs the critic's and
the reward-KL metrics next to the contract ones."""
from __future__ import annotations

import math

from .conftest import read_rows, run_recipe, train_rows

PPO_STAGES = ("gen", "reward", "old_log_prob", "ref", "values", "adv", "update_critic", "update_actor")


def test_ppo_inprocess_three_steps(assets, tmp_path):
    run = run_recipe("ppo", assets.args(tmp_path, "trainer.steps=3", assets.reward("parity")))
    assert run.step == 3
    assert set(run.groups) == {"actor", "ref", "critic", "reward"}
    rows = train_rows(tmp_path)
    assert sorted(rows) == [1, 2, 3]
    for step, row in rows.items():
        for key in ("critic/vf_loss", "values/mean", "returns/mean", "advantages/mean", "actor/reward_kl_penalty",
                    "actor/pg_loss", "reward/mean", "response_length/mean", "timing/step_s",
                    "throughput/tokens_per_s", *(f"timing/{s}_s" for s in PPO_STAGES)):
            assert key in row, f"step {step}: metrics.jsonl lacks {key}"
            assert row[key] is not None and math.isfinite(row[key]), f"step {step}: {key} = {row[key]}"
        assert row["critic/vf_loss"] > 0
    # step 1: actor == reference, so no KL penalty yet; after an update the penalty is non-zero
    assert rows[1]["actor/reward_kl_penalty"] == 0
    assert rows[3]["actor/reward_kl_penalty"] != 0
    # with the KL penalty in the reward, rewards differ from the raw scores once the actor moved
    assert rows[3]["reward/rewards_mean"] != rows[3]["reward/mean"]
    assert [r["step"] for r in read_rows(tmp_path)] == [0, 1, 2, 3, 3]
    assert (tmp_path / "reward_curve.png").exists()
