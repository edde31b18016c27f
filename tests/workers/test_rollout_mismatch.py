"""Rollout-vs-trainer mismatch metrics and truncated IS weights (workers/rollout/mismatch.py),
hand-computed; and the actor wiring them in (compute_log_prob → update), with the hf backend."""
import math
import os

import pytest
import torch

from hybridflow.workers.rollout.mismatch import rollout_mismatch_metrics, truncated_is_weights

RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")

ROLLOUT = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, -9.0]])
TRAINER = torch.tensor([[-1.5, -1.0, -0.5], [-3.0, -2.0, -1.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the last token is padding: its huge gap must not count


def test_mismatch_metrics_by_hand():
    d = [-0.5, 1.0, 0.0, 0.0, -1.0]  # trainer - rollout on the 5 masked tokens
    got = rollout_mismatch_metrics(ROLLOUT, TRAINER, MASK)
    assert got["rollout_corr/log_prob_abs_diff_mean"] == pytest.approx(2.5 / 5)
    assert got["rollout_corr/log_prob_abs_diff_max"] == pytest.approx(1.0)
    assert got["rollout_corr/kl_k1"] == pytest.approx(sum(-x for x in d) / 5)
    assert got["rollout_corr/kl_k3"] == pytest.approx(sum(math.exp(x) - x - 1 for x in d) / 5)
    assert rollout_mismatch_metrics(ROLLOUT, ROLLOUT, MASK)["rollout_corr/kl_k3"] == 0.0
    assert rollout_mismatch_metrics(ROLLOUT, TRAINER, torch.zeros_like(MASK)) == {}


def test_truncated_is_weights_by_hand():
    weights, metrics = truncated_is_weights(ROLLOUT, TRAINER, MASK, cap=2.0)
    want = torch.tensor([[math.exp(-0.5), 2.0, 1.0], [1.0, math.exp(-1.0), 0.0]])  # exp(1) = 2.72 capped at 2
    torch.testing.assert_close(weights, want)
    assert metrics["rollout_corr/is_capped_frac"] == pytest.approx(1 / 5)
    assert metrics["rollout_corr/is_weight_mean"] == pytest.approx(float(want.sum()) / 5)
    with pytest.raises(ValueError, match="rollout_is_cap"):
        truncated_is_weights(ROLLOUT, TRAINER, MASK, cap=0.0)


def test_policy_loss_uses_the_weights():
    """The IS weights reach the loss: tokens weighted 0 contribute nothing to the PPO loss."""
    from hybridflow.trainer.algos import get_policy_loss

    loss = get_policy_loss("ppo")
    adv = torch.tensor([[1.0, -2.0, 0.5], [0.3, 1.0, 1.0]])
    weights, _ = truncated_is_weights(ROLLOUT, TRAINER, MASK, cap=2.0)
    plain, _ = loss(TRAINER, TRAINER, adv, MASK)
    weighted, _ = loss(TRAINER, TRAINER, adv, MASK, rollout_is_weights=weights)
    # ratio 1 everywhere: token loss = -A (token-mean over the 5 masked tokens)
    assert plain.item() == pytest.approx(-(1.0 - 2.0 + 0.5 + 0.3 + 1.0) / 5)
    assert weighted.item() == pytest.approx(-float((adv * weights * MASK).sum()) / 5)


def test_actor_reports_mismatch_and_is_weights(tiny_ckpt):
    """compute_log_prob adds rollout_corr/* metrics and, with actor.rollout_is, the weights
    (≈1 for the hf backend, whose sampling log-probs are the trainer's)."""
    from hybridflow import DataProto
    from hybridflow.config import load_config
    from hybridflow.trainer.settings import typed_rl_settings
    from hybridflow.trainer.tiny_model import build_tokenizer
    from hybridflow.workers.roles.actor import ActorWorker

    cfg = load_config(os.path.join(RECIPES, "grpo.yaml"),
                      [f"model.path={tiny_ckpt}", "data.batch_size=2", "trainer.steps=1", "rollout.n=2",
                       "rollout.max_new_tokens=4", "rollout.temperature=0.7", "actor.rollout_is=true",
                       "actor.rollout_is_cap=1.5", "actor.lr=1e-3", "actor.use_kl_loss=false"])
    actor = ActorWorker.role(typed_rl_settings(cfg)).instantiate()
    tok = build_tokenizer()
    enc = tok(["12+3=", "7+8="], return_tensors="pt", padding=True, padding_side="left")
    mask = enc["attention_mask"]
    prompts = DataProto.from_dict({"input_ids": enc["input_ids"], "attention_mask": mask,
                                   "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}, meta_info={"seed": 1})
    batch = actor.generate(prompts)
    out = actor.compute_log_prob(batch)
    w = out.batch["rollout_is_weights"]
    resp = batch.batch["response_mask"].bool()
    torch.testing.assert_close(w[resp], torch.ones(int(resp.sum())), atol=1e-4, rtol=0)
    assert (w[~resp] == 0).all()

    batch.union(out)
    batch.batch["advantages"] = torch.ones_like(w)
    metrics = actor.update(batch).meta_info["metrics"]  # the mismatch metrics come with the update
    assert metrics["rollout_corr/log_prob_abs_diff_max"] < 1e-4
    assert abs(metrics["rollout_corr/kl_k1"]) < 1e-5
    assert metrics["rollout_corr/is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert "rollout/weight_sync_s" not in metrics  # hf generates on the actor's module: nothing to sync

    del batch.batch["rollout_log_probs"]
    with pytest.raises(ValueError, match="actor.rollout_is"):
        actor.compute_log_prob(batch)
