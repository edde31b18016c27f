"""Policy-gradient losses, registered by name.

Every loss has the signature::

    fn(old_log_prob, log_prob, advantages, response_mask, *, loss_agg_mode="token-mean", **cfg)
        -> (loss, metrics)

``old_log_prob`` / ``advantages`` are data (no gradient); ``log_prob`` is the current policy's
``[B, R]`` log-probs of the sampled tokens (with gradient). ``loss`` is a differentiable 0-d
tensor; ``metrics`` maps names to **detached 0-d tensors** (no host sync inside the training
step; the role calls ``float()`` when it reduces them). Unknown ``cfg`` keys are ignored.

Register your own with ``@register_policy_loss("name")``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch

from .aggregation import agg_loss
from .masked import masked_mean
from .registry import Registry

__all__ = ["POLICY_LOSSES", "register_policy_loss", "get_policy_loss", "ppo_clip_loss"]

POLICY_LOSSES = Registry("policy loss")

LOG_RATIO_CLAMP = 20.0


def register_policy_loss(name: str) -> Callable:
    """Decorator registering a policy loss under ``name`` (see module doc for the signature)."""
    return POLICY_LOSSES.register(name)


def get_policy_loss(name: str) -> Callable:
    """The policy loss registered as ``name``, or named by a ``path/to/file.py:fn`` / ``module:fn`` spec;
    unknown names raise with the closest matches."""
    return POLICY_LOSSES.resolve(name)


@register_policy_loss("ppo")
@register_policy_loss("vanilla")
def ppo_clip_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    loss_agg_mode: str = "token-mean",
    clip_ratio: Optional[float] = None,
    clip_ratio_low: Optional[float] = None,
    clip_ratio_high: Optional[float] = None,
    clip_ratio_c: float = 3.0,
    rollout_is_weights: Optional[torch.Tensor] = None,
    norm_constant: Optional[float] = None,
    **cfg: Any,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization Algorithms")
    with asymmetric clip bounds and dual-clip (Ye et al. 2020, "Mastering Complex Control in
    MOBA Games with Deep Reinforcement Learning").

    Per token, with ``rho = exp(clamp(log_prob - old_log_prob, -20, 20))``::

        l_clip = max(-A * rho, -A * clamp(rho, 1 - eps_low, 1 + eps_high))
        l      = min(l_clip, -A * c)   if A < 0        (dual-clip: caps the loss at c * |A|
               = l_clip                otherwise        when rho is huge on a bad action)
        l      = l * w                 if rollout_is_weights w is given
        loss   = agg_loss(l, response_mask, loss_agg_mode, norm_constant)

    Args:
        clip_ratio_low: ``eps_low`` (default ``clip_ratio`` if given, else 0.2).
        clip_ratio_high: ``eps_high`` (default ``eps_low``; > ``eps_low`` is DAPO's
            "clip-higher").
        clip_ratio: symmetric shorthand used when the low/high values are not given.
        clip_ratio_c: dual-clip constant ``c`` (> 1; default 3.0).
        rollout_is_weights: optional ``[B, R]`` per-token weights multiplying the loss, e.g.
            truncated importance-sampling ratios ``min(pi_old / pi_rollout, C)`` that correct
            for the rollout engine sampling from a slightly different distribution than the
            trainer computes (vLLM vs. training kernels). Treated as data (detached).
        norm_constant: passed to :func:`agg_loss`.

    Metrics (detached 0-d tensors, masked means over valid tokens):

    * ``actor/pg_clipfrac``: fraction of tokens where the ratio clip is active
      (``-A * clamp(rho) > -A * rho``).
    * ``actor/pg_clipfrac_lower``: fraction of tokens where the dual clip is active
      (``A < 0`` and ``l_clip > -A * c``).
    * ``actor/ppo_kl``: ``mean(old_log_prob - log_prob)``, a k1 estimate of KL(old || new).
    """
    eps_low = clip_ratio_low if clip_ratio_low is not None else (
        clip_ratio if clip_ratio is not None else 0.2
    )
    eps_high = clip_ratio_high if clip_ratio_high is not None else (
        clip_ratio if clip_ratio is not None else eps_low
    )
    if clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c (dual-clip constant) must be > 1.0, got {clip_ratio_c}")

    log_ratio = (log_prob - old_log_prob).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)

    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss_ppo = torch.maximum(loss_unclipped, loss_clipped)

    loss_dual_cap = -advantages * clip_ratio_c
    negative = advantages < 0
    loss_tok = torch.where(negative, torch.minimum(loss_ppo, loss_dual_cap), loss_ppo)

    if rollout_is_weights is not None:
        loss_tok = loss_tok * rollout_is_weights.detach()

    loss = agg_loss(loss_tok, response_mask, loss_agg_mode, norm_constant=norm_constant)

    with torch.no_grad():
        metrics = {
            "actor/pg_clipfrac": masked_mean(
                (loss_clipped > loss_unclipped).float(), response_mask
            ),
            "actor/pg_clipfrac_lower": masked_mean(
                (negative & (loss_ppo > loss_dual_cap)).float(), response_mask
            ),
            "actor/ppo_kl": masked_mean(old_log_prob - log_prob, response_mask),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}
