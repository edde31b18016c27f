"""GRPO with a pass@k advantage and the CISPO loss, built step by step in docs/write-your-own-algorithm.md.

    for each batch of prompts:
        responses ← actor.generate(prompts, n samples each)               # rollout
        r         ← reward(prompt, response) ∈ {0, 1}                     # verifiable reward
        logp_old  ← actor.log_prob(responses); logp_ref ← ref.log_prob(responses)
        A_i       ← pass@k advantage of r_i in its group (Chen et al. 2025)   # "passk" below
        actor.update: CISPO(ratio, A) + β·KL_k3(actor ‖ ref)              # "cispo" below

Run: ``python examples/passk_grpo.py [key=value ...]`` (defaults: examples/passk_grpo.yaml).
"""
import os
import sys
from math import comb

import torch

from hybridflow.config import parse_cli
from hybridflow.trainer.algos import agg_loss, masked_mean, register_advantage, register_policy_loss
from hybridflow.trainer.rl import compute_advantages, sample_and_score
from hybridflow.trainer.run import RLRun
from hybridflow.workers import build_workers


@register_advantage("passk")
def passk_advantage(token_level_rewards, response_mask, *, index=None, values=None, pass_k=1, **cfg):
    """Pass@k advantage (Chen et al. 2025, "Pass@k Training for Adaptively Balancing Exploration and
    Exploitation of Large Reasoning Models"). In a group of n samples, n_neg of them wrong (rewards
    0/1), each k-subset scores its best sample; a sample gets the mean normalised score of its subsets:

        R̄ = 1 − C(n_neg, k) / C(n, k)  (unbiased pass@k)    σ = sqrt(R̄ (1 − R̄))    A = 0 if σ = 0
        A_right = (1 − R̄) / σ          A_wrong = (1 − R̄ − C(n_neg − 1, k − 1) / C(n − 1, k − 1)) / σ
    """
    scores = (token_level_rewards * response_mask).sum(-1)
    if not bool(((scores == 0) | (scores == 1)).all()):
        raise ValueError("passk advantage: rewards must be 0 or 1 (use a pass/fail reward.function)")
    groups = {}
    for row, uid in enumerate(index):
        groups.setdefault(uid, []).append(row)
    adv, k = torch.zeros_like(scores), int(pass_k)
    for rows in groups.values():
        n, n_neg = len(rows), int((scores[rows] == 0).sum())
        if not 1 <= k <= n:
            raise ValueError(f"algorithm.pass_k={k} must be between 1 and the group size rollout.n={n}")
        mean = 1 - comb(n_neg, k) / comb(n, k)
        std = (mean * (1 - mean)) ** 0.5
        if std > 0:
            wrong = (1 - mean - comb(n_neg - 1, k - 1) / comb(n - 1, k - 1)) / std
            adv[rows] = torch.where(scores[rows] == 1, (1 - mean) / std, wrong).to(adv.dtype)
    advantages = adv[:, None] * response_mask
    return advantages, advantages.clone()


@register_policy_loss("cispo")
def cispo_loss(old_log_prob, log_prob, advantages, response_mask, *, loss_agg_mode="token-mean",
               clip_ratio_low=0.2, clip_ratio_high=0.2, norm_constant=None, **cfg):
    """CISPO (MiniMax 2025, "MiniMax-M1"): clip the importance weight, not the update, so every token
    keeps its gradient:  l_t = −sg(clamp(ρ_t, 1 − ε_low, 1 + ε_high)) · A_t · log π(y_t)."""
    ratio = torch.exp((log_prob - old_log_prob).clamp(-20, 20))
    weight = ratio.clamp(1 - clip_ratio_low, 1 + clip_ratio_high).detach()
    loss = agg_loss(-advantages * weight * log_prob, response_mask, loss_agg_mode, norm_constant=norm_constant)
    clipped = ((ratio < 1 - clip_ratio_low) | (ratio > 1 + clip_ratio_high)).float()
    return loss, {"actor/pg_clipfrac": masked_mean(clipped, response_mask).detach()}


def main(argv=None):
    cfg = parse_cli(sys.argv[1:] if argv is None else argv, os.path.join(os.path.dirname(__file__), "passk_grpo.yaml"))
    run = RLRun(cfg)                                   # typed settings (checked), data, run dir, trackers
    actor, ref, reward = build_workers(run.settings, "actor", "ref", "reward")
    run.attach(actor=actor, ref=ref, reward=reward)    # resume=auto restores weights, data order, step

    for step in run.steps():                           # data.batch_size prompts each, uids shared per prompt
        batch = sample_and_score(step, actor, reward)  # stages gen, reward, old_log_prob
        with step.stage("ref"):
            batch.union(ref.compute_ref_log_prob(batch))
        with step.stage("adv"):
            adv_metrics = compute_advantages(batch, run.settings.algorithm, run.kl_ctrl)  # "passk", k = algorithm.pass_k
        with step.stage("update_actor"):
            update = actor.update(batch)               # "cispo" + KL to the reference
        step.log(batch, adv_metrics, update)
    return run.finish()


if __name__ == "__main__":
    main()
