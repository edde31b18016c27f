"""Critic-free advantage estimators with other baselines than GRPO's group z-score.

All follow the registry contract of :mod:`.advantages`::

    fn(token_level_rewards, response_mask, *, index=None, values=None, **cfg)
        -> (advantages, returns)          # both [B, R], zero outside response_mask

* ``rloo``: REINFORCE leave-one-out (Ahmadian et al. 2024);
* ``reinforce_plus_plus``: REINFORCE++ (Hu 2025), discounted token returns + batch whitening;
* ``reinforce_plus_plus_baseline``: REINFORCE++ with a group-mean baseline (Hu 2025);
* ``remax``: ReMax (Li et al. 2023), the greedy response's reward as the baseline; needs the
  extra keyword ``baseline_scores`` (``[B]``, one per row), which ``recipes/remax.py`` provides.

Dr. GRPO needs no estimator of its own: it is ``grpo`` with ``norm_adv_by_std=false`` and the
``seq-mean-token-sum-norm`` loss aggregation (``recipes/dr_grpo.yaml``).

Shared conventions: a row's outcome reward is ``r_b = sum_t token_level_rewards[b, t] *
mask[b, t]`` (the score on the last token, minus the per-token KL penalty when
``algorithm.use_kl_in_reward``). A row whose mask is all zero gets advantage 0 and takes no part
in any group or batch statistic. Statistics are computed in float64; the outputs have the
rewards' dtype (float32 for integer rewards). Wherever there is no signal (a singleton group, a
group of equal rewards, a batch of equal returns) the baseline-subtracted reward is exactly 0,
never NaN or rounding noise (the REINFORCE++ estimators then whiten over the whole batch, which
shifts such rows by ``-mean / std`` like every other row).
"""
from __future__ import annotations

from typing import Any, Hashable, Optional, Sequence, Tuple

import torch

from .advantages import _group_ids, _out_dtype, register_advantage
from .masked import masked_whiten

__all__ = [
    "rloo_advantage",
    "reinforce_plus_plus_advantage",
    "reinforce_plus_plus_baseline_advantage",
    "remax_advantage",
]


# ----------------------------------------------------------------------------- helpers
def _check_shapes(name: str, token_level_rewards: torch.Tensor, response_mask: torch.Tensor) -> None:
    if token_level_rewards.dim() != 2 or response_mask.shape != token_level_rewards.shape:
        raise ValueError(
            f"{name}: token_level_rewards {tuple(token_level_rewards.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must have the same [B, R] shape"
        )


def _outcome(token_level_rewards: torch.Tensor, response_mask: torch.Tensor):
    """``(valid [B, R] bool, r [B] float64, row_ok [B] bool)``; masked positions are never read."""
    valid = response_mask != 0
    scores = torch.where(valid, token_level_rewards.double(), 0.0).sum(dim=-1)
    return valid, scores, valid.any(dim=-1)


def _group_stats(name: str, index, scores: torch.Tensor, row_ok: torch.Tensor):
    """Per row: ``(count_g, sum_g, no_spread_g)`` over the valid rows of its group ``g``.

    ``no_spread`` is True when every valid reward of the group is exactly equal (max == min)."""
    if index is None:
        raise ValueError(f"{name} advantage estimator needs `index` (the per-row prompt uid) to form groups")
    batch, device = scores.shape[0], scores.device
    group = torch.as_tensor(_group_ids(index, batch), device=device)
    n_groups = int(group.max()) + 1 if batch else 0
    ok = row_ok.double()
    count = torch.zeros(n_groups, dtype=torch.float64, device=device).index_add_(0, group, ok)
    total = torch.zeros_like(count).index_add_(0, group, scores * ok)
    inf = torch.full_like(count, float("inf"))
    gmax = (-inf).scatter_reduce(0, group, torch.where(row_ok, scores, -inf[group]), "amax")
    gmin = inf.scatter_reduce(0, group, torch.where(row_ok, scores, inf[group]), "amin")
    return count[group], total[group], (gmax == gmin)[group]


def _broadcast(adv: torch.Tensor, valid: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B]`` per-row advantage → ``[B, R]`` on the valid tokens, 0 elsewhere."""
    return torch.where(valid, adv.unsqueeze(-1), 0.0).to(_out_dtype(like))


def _whiten_tokens(x: torch.Tensor, valid: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`masked_whiten` over all valid tokens of the batch, 0 outside ``valid``; exactly 0
    everywhere when the valid values are all equal (or fewer than 2)."""
    values = x[valid]
    if values.numel() < 2 or bool(values.max() == values.min()):
        return torch.zeros_like(x)
    return torch.where(valid, masked_whiten(x, valid, eps=eps), 0.0)


# ----------------------------------------------------------------------------- RLOO
@register_advantage("rloo")
def rloo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    index: Optional[Sequence[Hashable]] = None,
    values: Optional[torch.Tensor] = None,
    **cfg: Any,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE
    Style Optimization for Learning from Human Feedback in LLMs").

    For row ``i`` in group ``g`` (rows sharing a prompt uid) of ``n_g`` valid rows::

        A_i = r_i - (1 / (n_g - 1)) * sum_{j in g, j != i} r_j
            = n_g / (n_g - 1) * (r_i - mean_g)
        advantages[i, t] = returns[i, t] = A_i * mask[i, t]

    Each sample's baseline is the mean reward of the *other* samples of its prompt, so it is
    independent of the sample itself (an unbiased REINFORCE baseline). ``A_i = 0`` for a group
    with a single valid row (no other sample) and for a group whose rewards are all equal.
    """
    _check_shapes("rloo", token_level_rewards, response_mask)
    with torch.no_grad():
        valid, scores, row_ok = _outcome(token_level_rewards, response_mask)
        count, total, no_spread = _group_stats("rloo", index, scores, row_ok)
        others_mean = (total - scores) / (count - 1.0).clamp_min(1.0)
        adv = torch.where((count < 2) | no_spread | ~row_ok, 0.0, scores - others_mean)
        advantages = _broadcast(adv, valid, token_level_rewards)
    return advantages, advantages.clone()


# ----------------------------------------------------------------------------- REINFORCE++
def _discounted_returns(rewards: torch.Tensor, valid: torch.Tensor, gamma: float) -> torch.Tensor:
    """``G_t = r_t + gamma * G_{next(t)}`` over the valid positions (0 after the last one);
    masked positions are skipped (never read, output 0), like GAE's."""
    zero = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    carry, out = zero, []
    for t in reversed(range(rewards.shape[1])):
        g_t = rewards[:, t] + gamma * carry
        carry = torch.where(valid[:, t], g_t, carry)
        out.append(torch.where(valid[:, t], g_t, zero))
    return torch.stack(out[::-1], dim=1) if out else torch.zeros_like(rewards)


@register_advantage("reinforce_plus_plus")
def reinforce_plus_plus_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    index: Optional[Sequence[Hashable]] = None,
    values: Optional[torch.Tensor] = None,
    gamma: float = 1.0,
    epsilon: float = 1e-8,
    **cfg: Any,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large
    Language Models").

    The token-level rewards already hold the per-token KL penalty (``r_t = score·[t = last] −
    β·KL_t``, from ``algorithm.use_kl_in_reward=true``). Over the valid tokens of each row::

        G_t = sum_{k >= t, k valid} gamma^(#valid steps from t to k) * r_k   (discounted return)
        A_t = (G_t - mean(G)) / sqrt(var(G) + epsilon)                     (global whitening)
        advantages = A * mask,  returns = G * mask

    ``mean``/``var`` (unbiased) run over all valid tokens of the batch: no critic and no group,
    the batch statistics are the baseline. Masked positions are skipped (a hole inside a row is
    bridged). ``index`` is not used. All-equal returns (or fewer than 2 valid tokens) → A = 0.

    Args:
        gamma: discount factor (``algorithm.gamma``; 1.0 for LLMs).
        epsilon: added to the variance.
    """
    _check_shapes("reinforce_plus_plus", token_level_rewards, response_mask)
    with torch.no_grad():
        valid = response_mask != 0
        returns = _discounted_returns(token_level_rewards.double(), valid, float(gamma))
        advantages = _whiten_tokens(returns, valid, epsilon)
        dtype = _out_dtype(token_level_rewards)
    return advantages.to(dtype), returns.to(dtype)


@register_advantage("reinforce_plus_plus_baseline")
def reinforce_plus_plus_baseline_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    index: Optional[Sequence[Hashable]] = None,
    values: Optional[torch.Tensor] = None,
    epsilon: float = 1e-8,
    **cfg: Any,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++-Baseline (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning
    Large Language Models"): a group-mean baseline, then the global whitening of REINFORCE++.

    For row ``i`` in group ``g`` (rows sharing a prompt uid)::

        a_i = r_i - mean_{j in g} r_j                      (outcome reward minus group mean)
        A_{i,t} = (a_i - mean(a)) / sqrt(var(a) + epsilon)  over all valid tokens of the batch
        advantages = returns = A * mask

    The batch mean and unbiased variance are taken over valid *tokens*, so a row weighs by its
    length, as in REINFORCE++. ``a_i = 0`` for a singleton group (its own mean), so ``n = 1``
    gives no signal (as in OpenRLHF's ``reinforce_baseline``); use ``reinforce_plus_plus`` then.
    """
    _check_shapes("reinforce_plus_plus_baseline", token_level_rewards, response_mask)
    with torch.no_grad():
        valid, scores, row_ok = _outcome(token_level_rewards, response_mask)
        count, total, no_spread = _group_stats("reinforce_plus_plus_baseline", index, scores, row_ok)
        centred = torch.where((count < 2) | no_spread | ~row_ok, 0.0, scores - total / count.clamp_min(1.0))
        per_token = torch.where(valid, centred.unsqueeze(-1), 0.0)
        advantages = _whiten_tokens(per_token, valid, epsilon).to(_out_dtype(token_level_rewards))
    return advantages, advantages.clone()


# ----------------------------------------------------------------------------- ReMax
@register_advantage("remax")
def remax_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    index: Optional[Sequence[Hashable]] = None,
    values: Optional[torch.Tensor] = None,
    baseline_scores: Optional[torch.Tensor] = None,
    **cfg: Any,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """ReMax (Li et al. 2023, "ReMax: A Simple, Effective, and Efficient Reinforcement Learning
    Method for Aligning Large Language Models").

    ``baseline_scores[i]`` is the reward of the *greedy* response to row ``i``'s prompt (the
    recipe generates it with ``do_sample=False`` and scores it with the reward function)::

        A_i = r_i - baseline_scores[i]
        advantages[i, t] = returns[i, t] = A_i * mask[i, t]

    The greedy response does not depend on the sampled one, so the baseline keeps the gradient
    unbiased while removing the prompt's difficulty from it. ``index`` is not used.

    Args:
        baseline_scores: ``[B]`` tensor (or sequence) aligned with the rows; required. Pass it
            as an extra keyword: it is not an ``algorithm`` config key.
    """
    _check_shapes("remax", token_level_rewards, response_mask)
    if baseline_scores is None:
        raise ValueError(
            "remax advantage estimator needs `baseline_scores` ([B], the greedy response's reward per row); "
            "recipes/remax.py computes it"
        )
    baseline = torch.as_tensor(baseline_scores, device=token_level_rewards.device).double().reshape(-1)
    if baseline.shape[0] != token_level_rewards.shape[0]:
        raise ValueError(f"remax: baseline_scores has {baseline.shape[0]} entries but the batch has "
                         f"{token_level_rewards.shape[0]} rows")
    with torch.no_grad():
        valid, scores, row_ok = _outcome(token_level_rewards, response_mask)
        adv = torch.where(row_ok, scores - baseline, 0.0)
        advantages = _broadcast(adv, valid, token_level_rewards)
    return advantages, advantages.clone()
