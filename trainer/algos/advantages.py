"""Advantage estimators, registered by name.

Every estimator has the signature::

    fn(token_level_rewards, response_mask, *, index=None, values=None, **cfg)
        -> (advantages, returns)          # both [B, R], zero outside response_mask

``token_level_rewards`` is ``[B, R]`` (the reward model / function score sits on the last
response token, minus an optional per-token KL penalty); ``index`` is a length-``B`` sequence
of hashable group ids (the ``uid`` column: all samples of one prompt share it); ``values`` is
the critic's ``[B, R]`` output. Unknown ``cfg`` keys are ignored, so a whole ``algorithm``
config section can be passed through.

Register your own with ``@register_advantage("name")``.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .masked import masked_whiten
from .registry import Registry

__all__ = ["ADVANTAGES", "register_advantage", "get_advantage", "gae_advantage", "grpo_advantage"]

ADVANTAGES = Registry("advantage estimator")


def register_advantage(name: str) -> Callable:
    """Decorator registering an advantage estimator under ``name`` (see module doc for the
    signature)."""
    return ADVANTAGES.register(name)


def get_advantage(name: str) -> Callable:
    """The estimator registered as ``name``, or named by a ``path/to/file.py:fn`` / ``module:fn`` spec;
    unknown names raise with the closest matches."""
    return ADVANTAGES.resolve(name)


@register_advantage("gae")
def gae_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    index: Optional[Sequence[Hashable]] = None,
    values: Optional[torch.Tensor] = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    **cfg: Any,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, "High-Dimensional Continuous
    Control Using Generalized Advantage Estimation"), as used by PPO.

    Over the valid (masked) tokens of a row, in order, with ``V_{next} = 0`` after the last one::

        delta_t = r_t + gamma * V_{next(t)} - V_t
        A_t     = delta_t + gamma * lam * A_{next(t)}          (A after the last token = 0)
        returns_t = A_t
        advantages = whiten(A) over all masked tokens of the batch, then zeroed outside the mask
        returns    = (A + V) * mask

    where ``whiten(x) = (x - mean) / sqrt(var + 1e-8)`` (unbiased variance).

    Masked positions are *skipped*, not treated as steps: their rewards and values are never
    read, and ``next(t)`` is the next valid position. For the usual right-padded response this
    means the value bootstrap after EOS is 0 (the episode ends there) however much garbage the
    critic outputs on padding; a hole inside a response (e.g. masked tool output in multi-turn
    rollouts) is bridged as if the hole were not there.

    Args:
        values: critic values ``[B, R]`` (required).
        gamma: discount factor. lam: GAE lambda. (LLM RL commonly uses 1.0 for both.)
    """
    if values is None:
        raise ValueError("gae advantage estimator needs `values` (the critic's [B, R] output)")
    shape = token_level_rewards.shape
    if values.shape != shape or response_mask.shape != shape:
        raise ValueError(
            "gae: token_level_rewards, values and response_mask must have the same [B, R] shape, "
            f"got {tuple(token_level_rewards.shape)}, {tuple(values.shape)}, "
            f"{tuple(response_mask.shape)}"
        )
    with torch.no_grad():
        rewards = token_level_rewards.float()
        vals = values.float()
        valid = response_mask != 0
        batch, length = rewards.shape
        zero = torch.zeros(batch, dtype=torch.float32, device=rewards.device)
        next_value, next_adv = zero, zero
        adv_reversed: List[torch.Tensor] = []
        for t in reversed(range(length)):
            delta = rewards[:, t] + gamma * next_value - vals[:, t]
            adv_t = delta + gamma * lam * next_adv
            # Invalid positions pass the carried (value, advantage) through unchanged.
            next_adv = torch.where(valid[:, t], adv_t, next_adv)
            next_value = torch.where(valid[:, t], vals[:, t], next_value)
            adv_reversed.append(torch.where(valid[:, t], adv_t, zero))
        raw_adv = torch.stack(adv_reversed[::-1], dim=1)
        returns = torch.where(valid, raw_adv + vals, 0.0)
        advantages = torch.where(valid, masked_whiten(raw_adv, valid), 0.0)
    dtype = _out_dtype(token_level_rewards)
    return advantages.to(dtype), returns.to(dtype)


def _out_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.float32


def _group_ids(index: Sequence[Hashable], batch: int) -> np.ndarray:
    """Map arbitrary hashable group ids to dense ints ``0..G-1`` (first-seen order)."""
    if isinstance(index, torch.Tensor):
        index = index.tolist()
    if len(index) != batch:
        raise ValueError(f"index has {len(index)} entries but the batch has {batch} rows")
    dense: dict = {}
    return np.asarray([dense.setdefault(uid, len(dense)) for uid in index], dtype=np.int64)


@register_advantage("grpo")
def grpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    index: Optional[Sequence[Hashable]] = None,
    values: Optional[torch.Tensor] = None,
    norm_adv_by_std: bool = True,
    epsilon: float = 1e-6,
    **cfg: Any,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Group-relative outcome advantage (Shao et al. 2024, "DeepSeekMath: Pushing the Limits of
    Mathematical Reasoning in Open Language Models").

    Each row's outcome reward is ``r_b = sum_t token_level_rewards[b, t] * mask[b, t]``. Rows
    are grouped by ``index`` (the prompt uid), and for row ``b`` in group ``g``::

        A_b = (r_b - mean_g) / (std_g + epsilon)   if norm_adv_by_std  (GRPO)
        A_b =  r_b - mean_g                         otherwise           (Dr. GRPO, "Understanding
                                                                         R1-Zero-Like Training")
        advantages[b, t] = returns[b, t] = A_b * mask[b, t]

    ``std_g`` is the *unbiased* sample standard deviation (divides by ``n_g - 1``, like
    ``torch.std``'s default). Special cases, all giving exactly 0 (never NaN):

    * a group of one row (no baseline to compare with);
    * a group whose rewards are all equal (no learning signal);
    * a row with an all-zero mask: it is also left out of its group's mean and std.

    Statistics are computed in float64.
    """
    if index is None:
        raise ValueError(
            "grpo advantage estimator needs `index` (the per-row prompt uid) to form groups"
        )
    if response_mask.shape != token_level_rewards.shape:
        raise ValueError(
            f"grpo: token_level_rewards {tuple(token_level_rewards.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must have the same [B, R] shape"
        )
    batch = token_level_rewards.shape[0]
    device = token_level_rewards.device
    with torch.no_grad():
        valid = response_mask != 0
        scores = torch.where(valid, token_level_rewards.double(), 0.0).sum(dim=-1)
        row_ok = valid.any(dim=-1)
        group_np = _group_ids(index, batch)
        n_groups = int(group_np.max()) + 1 if batch else 0
        group = torch.as_tensor(group_np, device=device)

        ok = row_ok.double()
        count = torch.zeros(n_groups, dtype=torch.float64, device=device).index_add_(0, group, ok)
        total = torch.zeros_like(count).index_add_(0, group, scores * ok)
        mean = total / count.clamp_min(1.0)
        centered = (scores - mean[group]) * ok
        sq = torch.zeros_like(count).index_add_(0, group, centered**2)
        std = torch.sqrt(sq / (count - 1.0).clamp_min(1.0))
        # Exact equality check (max == min) so equal rewards give exactly 0, not rounding noise.
        inf = torch.full_like(count, float("inf"))
        gmax = (-inf).scatter_reduce(0, group, torch.where(row_ok, scores, -inf[group]), "amax")
        gmin = inf.scatter_reduce(0, group, torch.where(row_ok, scores, inf[group]), "amin")
        no_signal = (count[group] < 2) | (gmax[group] == gmin[group]) | ~row_ok

        adv = centered / (std[group] + epsilon) if norm_adv_by_std else centered
        adv = torch.where(no_signal, 0.0, adv)
        dtype = _out_dtype(token_level_rewards)
        advantages = torch.where(valid, adv.unsqueeze(-1), 0.0).to(dtype)
    return advantages, advantages.clone()
