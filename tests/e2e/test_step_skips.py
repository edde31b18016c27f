"""A GRPO step does only the work its config needs, decided once from the settings: no reference
when no KL term reads it, no separate old-log-prob forward when the batch feeds one optimizer step.
The short path trains exactly like the full one; the full path still runs when the config needs it."""
from __future__ import annotations

import pytest

from .conftest import comparable, run_recipe, train_rows

FAST = ("trainer.steps=3", "trainer.val_every=0", "trainer.val_before_train=false", "trainer.plot=false")
SAME = ("reward/mean", "actor/pg_loss", "actor/grad_norm", "actor/entropy", "response_length/mean", "advantages/max")


def test_the_short_path_trains_like_the_full_one(assets, tmp_path, runs):
    full = run_recipe("grpo", assets.args(tmp_path / "full", assets.reward("parity"), "actor.use_kl_loss=true",
                                          "actor.kl_loss_coef=0.0", "actor.old_log_prob=recompute", *FAST))
    short = run_recipe("grpo", assets.args(tmp_path / "short", assets.reward("parity"), "actor.use_kl_loss=false",
                                           *FAST))
    assert set(full.groups) == {"actor", "ref", "reward"} and set(short.groups) == {"actor", "reward"}
    a, b = train_rows(tmp_path / "full"), train_rows(tmp_path / "short")
    for step in (1, 2, 3):
        assert "timing/ref_s" in a[step] and "timing/old_log_prob_s" in a[step]
        assert "timing/ref_s" not in b[step] and "timing/old_log_prob_s" not in b[step]
        assert b[step]["actor/old_log_prob_from_update"] == 1.0 and "actor/old_log_prob_from_update" not in a[step]
        for key in SAME:  # same samples, same updates, step after step
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-6), (step, key)


@pytest.mark.parametrize("overrides", [("actor.ppo_epochs=2",), ("actor.ppo_mini_batch_size=16",),
                                       ("algorithm.use_kl_in_reward=true", "actor.use_kl_loss=false")],
                         ids=["two-epochs", "two-mini-batches", "kl-in-the-reward"])
def test_the_full_path_runs_when_the_config_needs_it(assets, tmp_path, runs, overrides):
    run = run_recipe("grpo", assets.args(tmp_path, assets.reward("parity"), *overrides, *FAST))
    rows = train_rows(tmp_path)
    assert run.settings.actor.old_log_prob == "recompute"
    assert all("timing/old_log_prob_s" in r and "actor/old_log_prob_from_update" not in r for r in rows.values())
    kl = "algorithm.use_kl_in_reward=true" in overrides
    assert ("ref" in run.groups) and all("timing/ref_s" in r for r in rows.values())  # grpo.yaml's KL loss, or KL in r
    assert all(("actor/reward_kl_penalty" in r) == kl for r in rows.values())
    assert comparable(rows[3])["actor/grad_norm"] > 0
