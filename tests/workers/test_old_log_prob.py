"""``actor.old_log_prob``: where the update's π_old comes from. With one optimizer step per batch the
update's own forward (detached) gives the same update as the recomputed π_old, without the extra
forward; the rollout's log-probs (bypass) give it up to the rollout-vs-trainer gap."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from hybridflow import DataProto

RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")


def make_actor(tiny_ckpt, old_log_prob, *overrides):
    from hybridflow.config import load_config
    from hybridflow.trainer.settings import typed_rl_settings
    from hybridflow.workers.roles.actor import ActorWorker

    cfg = load_config(os.path.join(RECIPES, "grpo.yaml"),
                      [f"model.path={tiny_ckpt}", "data.batch_size=2", "rollout.n=4", "rollout.max_new_tokens=4",
                       "actor.use_kl_loss=false", "actor.lr=1.0", "trainer.steps=1",
                       "+actor.eps=1.0", *overrides])  # Adam with eps 1: a step ~ lr·g, so gradient gaps show
    s = typed_rl_settings(cfg)
    return ActorWorker.role(dataclasses.replace(s, actor=dataclasses.replace(s.actor, old_log_prob=old_log_prob)))\
        .instantiate()


def params(actor):
    return {k: v.detach().clone() for k, v in actor.engine.module.state_dict().items()}


@pytest.fixture
def batch(tiny_ckpt):
    from hybridflow.trainer.tiny_model import build_tokenizer

    tok = build_tokenizer()
    enc = tok(["12+3=", "7+8="], return_tensors="pt", padding=True, padding_side="left")
    mask = enc["attention_mask"]
    prompts = DataProto.from_dict({"input_ids": enc["input_ids"], "attention_mask": mask,
                                   "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}, meta_info={"seed": 3})
    out = make_actor(tiny_ckpt, "recompute").generate(prompts)
    out.batch["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.0, 1.0])[:, None] \
        * out.batch["response_mask"]
    return out


def test_the_updates_own_forward_gives_the_recomputed_update(tiny_ckpt, batch):
    full = make_actor(tiny_ckpt, "recompute")
    recomputed = batch.copy()
    recomputed.union(full.compute_log_prob(recomputed))
    full_metrics = full.update(recomputed).meta_info["metrics"]
    fast = make_actor(tiny_ckpt, "update")
    fast_metrics = fast.update(batch.copy()).meta_info["metrics"]  # no old_log_probs column: none was computed
    before = params(make_actor(tiny_ckpt, "update"))
    moved = max(float((before[k] - v).abs().max()) for k, v in params(full).items())
    assert moved > 1e-3, "the update barely moved the weights: the comparison below would be vacuous"
    for key, value in params(full).items():
        torch.testing.assert_close(params(fast)[key], value, atol=1e-6, rtol=1e-6, msg=key)
    assert fast_metrics["actor/old_log_prob_from_update"] == 1.0 and "actor/old_log_prob_from_update" not in full_metrics
    assert fast_metrics["actor/pg_loss"] == pytest.approx(full_metrics["actor/pg_loss"], abs=1e-6)
    assert fast_metrics["rollout_corr/log_prob_abs_diff_max"] < 1e-5  # the update reports the stage's metrics


def test_the_rollouts_log_probs_give_the_same_update_up_to_the_rollout_gap(tiny_ckpt, batch):
    full = make_actor(tiny_ckpt, "recompute")
    recomputed = batch.copy()
    recomputed.union(full.compute_log_prob(recomputed))
    full.update(recomputed)
    bypass = make_actor(tiny_ckpt, "rollout")
    metrics = bypass.update(batch.copy()).meta_info["metrics"]
    assert metrics["actor/old_log_prob_from_rollout"] == 1.0
    for key, value in params(full).items():
        torch.testing.assert_close(params(bypass)[key], value, atol=1e-5, rtol=1e-5, msg=key)


def test_with_two_mini_batches_only_the_recomputed_pi_old_is_right(tiny_ckpt, batch):
    """The second mini-batch runs after the first moved the policy: π_old must be the old policy's,
    which only the recompute gives (why auto picks recompute there, and update is refused)."""
    full = make_actor(tiny_ckpt, "recompute", "actor.ppo_mini_batch_size=4")
    recomputed = batch.copy()
    recomputed.union(full.compute_log_prob(recomputed))
    full.update(recomputed)
    wrong = make_actor(tiny_ckpt, "update", "actor.ppo_mini_batch_size=4")
    wrong.update(batch.copy())
    gap = max(float((params(full)[k] - v).abs().max()) for k, v in params(wrong).items())
    assert gap > 1e-6
    with pytest.raises(KeyError, match="call actor.compute_log_prob first"):
        make_actor(tiny_ckpt, "recompute").update(batch.copy())
