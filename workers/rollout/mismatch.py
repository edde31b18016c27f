"""Rollout-vs-trainer log-prob mismatch and its truncated importance-sampling correction.

The rollout engine samples from ``pi_rollout`` (its own kernels, maybe another dtype) while the
trainer computes ``pi_old`` for the same tokens; the two differ slightly (exactly 0 for the hf
backend up to float error). With ``r = rollout_log_probs``, ``t = old_log_probs`` and ``d = t - r``
per response token (``response_mask``)::

    log_prob_abs_diff_mean = mean |d|            log_prob_abs_diff_max = max |d|
    kl_k1 = mean(-d)                 # estimates KL(pi_rollout || pi_old): the tokens come from pi_rollout
    kl_k3 = mean(exp(d) - d - 1)     # the same KL, a non-negative low-variance estimator

Truncated importance sampling (Ionides 2008; "truncated IS" for off-policy rollouts, as in Yao
et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training") reweights the
policy loss of each token by ``w = min(exp(t - r), C)``, the ratio of the distribution the loss
assumes to the one that sampled, capped at ``C`` (``actor.rollout_is_cap``) to bound the variance.
"""
from __future__ import annotations

from typing import Dict

import torch

__all__ = ["rollout_mismatch_metrics", "truncated_is_weights"]

PREFIX = "rollout_corr/"


def rollout_mismatch_metrics(rollout_log_probs: torch.Tensor, old_log_probs: torch.Tensor,
                             response_mask: torch.Tensor) -> Dict[str, float]:
    """The mismatch statistics of the module docstring over the masked tokens (``[B, R]`` each);
    ``{}`` when no token is masked in."""
    mask = response_mask.bool()
    if not mask.any():
        return {}
    d = (old_log_probs.float() - rollout_log_probs.float())[mask]
    return {
        PREFIX + "log_prob_abs_diff_mean": d.abs().mean().item(),
        PREFIX + "log_prob_abs_diff_max": d.abs().max().item(),
        PREFIX + "kl_k1": (-d).mean().item(),
        PREFIX + "kl_k3": (torch.expm1(d) - d).mean().item(),
    }


def truncated_is_weights(rollout_log_probs: torch.Tensor, old_log_probs: torch.Tensor,
                         response_mask: torch.Tensor, cap: float) -> tuple[torch.Tensor, Dict[str, float]]:
    """``w = min(exp(old - rollout), cap)`` per token, 0 outside ``response_mask`` (``[B, R]``
    float32), and metrics: the mean weight and the fraction of tokens capped."""
    if not cap > 0:
        raise ValueError(f"actor.rollout_is_cap must be > 0, got {cap}")
    mask = response_mask.bool()
    log_ratio = (old_log_probs.float() - rollout_log_probs.float()).clamp(max=20.0)
    raw = torch.exp(log_ratio)
    weights = torch.where(mask, raw.clamp(max=float(cap)), torch.zeros_like(raw))
    metrics = {}
    if mask.any():
        metrics = {PREFIX + "is_weight_mean": weights[mask].mean().item(),
                   PREFIX + "is_capped_frac": (raw[mask] > float(cap)).float().mean().item()}
    return weights, metrics
