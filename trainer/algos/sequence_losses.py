"""Policy losses whose importance ratio looks beyond the single token: GSPO and CTPO.

Both follow the policy-loss contract of :mod:`.policy_losses`::

    fn(old_log_prob, log_prob, advantages, response_mask, *, loss_agg_mode, **cfg) -> (loss, metrics)

and are registered by name (``actor.policy_loss: gspo`` / ``ctpo``). A token-level PPO ratio
``pi(y_t) / pi_old(y_t)`` ignores that the *prefix* ``y_<t`` was also sampled from ``pi_old``:

* ``gspo`` replaces it by one length-normalised **sequence** ratio per response;
* ``ctpo`` weights token ``t`` by the **cumulative** ratio of its prefix ``y_<=t``.

Both use the same "stop-gradient decomposition" to give each token its own gradient term::

    log w_t = sg[log W_t] + log pi(y_t) - sg[log pi(y_t)]

so ``w_t`` has the *value* of the sequence/prefix weight ``W_t`` but its gradient is
``W_t * grad log pi(y_t)`` (the weight acts as a constant importance weight on the token's
score function). ``sg`` is ``detach()``.

Conventions shared with ``ppo``: the per-token log-ratio is clamped to ``[-20, 20]``; positions
where ``response_mask == 0`` are never read (``inf``/``nan`` there do not reach the loss or the
gradient); a row whose mask is all zero contributes nothing; metrics are detached 0-d tensors;
``rollout_is_weights`` (optional ``[B, R]``) multiply the per-token loss as data.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from .aggregation import agg_loss
from .masked import masked_mean
from .policy_losses import LOG_RATIO_CLAMP, register_policy_loss

__all__ = ["gspo_loss", "ctpo_loss"]


def _masked_log_ratio(old_log_prob: torch.Tensor, log_prob: torch.Tensor, valid: torch.Tensor):
    """``(log_prob with 0 outside the mask, clamp(log_prob - old_log_prob) with 0 outside)``.

    ``torch.where`` on the inputs (not on the result) keeps padding garbage out of the gradient:
    the backward of ``where`` sends exactly 0 to the unselected positions."""
    zero = torch.zeros((), dtype=log_prob.dtype, device=log_prob.device)
    lp = torch.where(valid, log_prob, zero)
    old = torch.where(valid, old_log_prob.to(log_prob.dtype), zero)
    log_ratio = (lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return lp, log_ratio


@register_policy_loss("gspo")
def gspo_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    loss_agg_mode: str = "seq-mean-token-mean",
    clip_ratio_low: Optional[float] = None,
    clip_ratio_high: Optional[float] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    norm_constant: Optional[float] = None,
    **cfg: Any,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"), in its token form
    **GSPO-token**.

    Sequence ratio of response ``i`` (length-normalised: the geometric mean of its token ratios),
    over its ``|y_i|`` masked tokens::

        s_i     = exp( (1/|y_i|) * sum_t (log pi(y_i,t) - log pi_old(y_i,t)) )
        s_i,t   = sg[s_i] * pi(y_i,t) / sg[pi(y_i,t)]          (value s_i at every token)
        l_i,t   = max(-A_i,t * s_i,t, -A_i,t * clamp(s_i,t, 1 - eps_low, 1 + eps_high))
        loss    = agg_loss(l, response_mask, loss_agg_mode)

    With one advantage per response (``A_i,t = A_i``, as from ``grpo``) and
    ``loss_agg_mode=seq-mean-token-mean`` this is exactly the paper's sequence objective
    ``-(1/G) sum_i min(s_i A_i, clip(s_i) A_i)``: the same value, and the same gradient
    ``-A_i * s_i * (1/|y_i|) sum_t grad log pi(y_i,t)`` while ``s_i`` is inside the clip range,
    0 once clipped (the clip acts on the whole sequence, never on single tokens). The token form
    also accepts per-token advantages. ``token-mean`` aggregation weighs long responses more
    (not the paper's objective); the GSPO recipe uses ``seq-mean-token-mean``.

    Args:
        clip_ratio_low, clip_ratio_high: ``eps_low``/``eps_high`` of the sequence clip. Sequence
            ratios stay much closer to 1 than token ratios, so the paper's values are tiny:
            ``3e-4`` and ``4e-4`` (the defaults when not given).
        rollout_is_weights, norm_constant: as for ``ppo``.

    Metrics (detached 0-d tensors):

    * ``actor/pg_clipfrac``: fraction of masked tokens whose loss is the clipped term (a clipped
      sequence clips all its tokens; comparable with ``ppo``'s token clip fraction).
    * ``actor/pg_clipfrac_seq``: fraction of non-empty responses with at least one clipped token
      (all of them when the advantage is one per response).
    * ``actor/seq_ratio_mean``: mean of ``s_i`` over non-empty responses.
    * ``actor/ppo_kl``: ``mean(old_log_prob - log_prob)`` over masked tokens.
    """
    eps_low = 3e-4 if clip_ratio_low is None else float(clip_ratio_low)
    eps_high = 4e-4 if clip_ratio_high is None else float(clip_ratio_high)
    valid = response_mask != 0
    lp, log_ratio = _masked_log_ratio(old_log_prob, log_prob, valid)
    lengths = valid.sum(dim=-1)
    log_seq_ratio = log_ratio.sum(dim=-1) / lengths.clamp_min(1).to(log_ratio.dtype)  # log s_i; 0 if empty

    log_s_tok = (log_seq_ratio.detach().unsqueeze(-1) + lp - lp.detach()).clamp(max=LOG_RATIO_CLAMP)
    s_tok = torch.exp(log_s_tok)
    loss_unclipped = -advantages * s_tok
    loss_clipped = -advantages * s_tok.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss_tok = torch.maximum(loss_unclipped, loss_clipped)
    if rollout_is_weights is not None:
        loss_tok = loss_tok * rollout_is_weights.detach()
    loss = agg_loss(loss_tok, response_mask, loss_agg_mode, norm_constant=norm_constant)

    with torch.no_grad():
        clipped = (loss_clipped > loss_unclipped) & valid
        rows = valid.any(dim=-1)
        metrics = {
            "actor/pg_clipfrac": masked_mean(clipped.float(), response_mask),
            "actor/pg_clipfrac_seq": masked_mean(clipped.any(dim=-1).float(), rows),
            "actor/seq_ratio_mean": masked_mean(torch.exp(log_seq_ratio), rows),
            "actor/ppo_kl": masked_mean(-log_ratio, response_mask),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}


@register_policy_loss("ctpo")
def ctpo_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    loss_agg_mode: str = "token-mean",
    ctpo_log_clip_low: float = 0.025,
    ctpo_log_clip_high: float = 0.05,
    ctpo_log_clip_c: Optional[float] = 0.05,
    ctpo_clip_power: float = 0.5,
    rollout_is_weights: Optional[torch.Tensor] = None,
    norm_constant: Optional[float] = None,
    **cfg: Any,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """CTPO, Cumulative Token Policy Optimization (Zhang et al. 2026, "Rethinking Importance
    Sampling in LLM Policy Optimization: A Cumulative Token Perspective"), in its
    position-adaptive ("-LA") form.

    Token ``t`` of a response is weighted by the importance ratio of its whole prefix ``y_<=t``
    (the product of the token ratios up to ``t``), computed in log space; ``t`` counts the masked
    tokens of the row from 1::

        delta_k = clamp(log pi(y_k) - log pi_old(y_k), -20, 20)     (0 outside the mask)
        L_t     = sum_{k <= t} delta_k                               log of prod_{k<=t} ratio_k
        rho_t   = exp(sg[L_t] + log pi(y_t) - sg[log pi(y_t)])       value prod_{k<=t} ratio_k,
                                                                     gradient rho_t * grad log pi(y_t)

    Clipping is in log space with bounds that grow like ``t^p`` (``p = 0.5``: the standard
    deviation of a sum of ``t`` log-ratios grows like ``sqrt(t)``)::

        lo_t = -c_low * t^p,   hi_t = c_high * t^p
        l_t  = max(-A_t * rho_t, -A_t * exp(clamp(log rho_t, lo_t, hi_t)))
        l_t  = min(l_t, -A_t * exp(c_dual * t^p))      if A_t < 0    (dual clip)
        loss = agg_loss(l, response_mask, loss_agg_mode)

    The gradient of token ``t`` is ``-A_t * prod_{k<=t} ratio_k * grad log pi(y_t)`` (the prefix
    product is a constant weight, not differentiated), which is the unbiased prefix correction the
    paper argues for; it is 0 where a clip is active.

    Provenance: this follows the paper's description as given in the issue (each token weighted
    by the product of the token ratios over its prefix, computed in log space as a cumsum of
    log-ratios, clipped) and in the paper's abstract (log-space clip bounds scaled with the
    ``sqrt(t)`` growth of the cumulative log-ratio). The paper's equations could not be read here;
    the remaining details follow the authors' public reference implementation (loss mode
    ``cum-token-cumprod-la``): the stop-gradient form, ``t`` counted from 1 over the masked
    tokens, the dual clip scaled like the bounds, the defaults 0.025 / 0.05 / 0.05 / 0.5 (the
    log-ratios are clamped to +-20 as in ``ppo``; the reference caps ``L_t`` at 10). Whether the paper's headline CTPO includes the dual clip is not
    certain; ``ctpo_log_clip_c: null`` turns it off.

    Args:
        ctpo_log_clip_low, ctpo_log_clip_high: ``c_low``, ``c_high`` (log-space, > 0).
        ctpo_log_clip_c: ``c_dual``; ``None`` disables the dual clip.
        ctpo_clip_power: ``p``; 0 gives position-independent bounds ``[e^-c_low, e^c_high]``.
        rollout_is_weights, norm_constant: as for ``ppo``.

    Metrics (detached 0-d tensors, over masked tokens): ``actor/pg_clipfrac`` (the clipped term is
    the loss), ``actor/pg_clipfrac_lower`` (the dual clip is active), ``actor/ppo_kl``
    (``mean(old_log_prob - log_prob)``), ``actor/cum_log_ratio_absmax`` (``max |L_t|``).
    """
    if ctpo_log_clip_low <= 0 or ctpo_log_clip_high <= 0:
        raise ValueError(f"ctpo: log-space clip bounds must be > 0, got low={ctpo_log_clip_low} "
                         f"high={ctpo_log_clip_high}")
    if ctpo_log_clip_c is not None and ctpo_log_clip_c <= 0:
        raise ValueError(f"ctpo: ctpo_log_clip_c must be > 0 (or null to disable), got {ctpo_log_clip_c}")
    valid = response_mask != 0
    lp, log_ratio = _masked_log_ratio(old_log_prob, log_prob, valid)
    cum_log_ratio = torch.cumsum(log_ratio, dim=-1)                                # L_t
    log_rho = (cum_log_ratio.detach() + lp - lp.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    rho = torch.exp(log_rho)

    position = torch.cumsum(valid.to(log_rho.dtype), dim=-1).clamp_min(1.0)       # t = 1, 2, ...
    scale = position.pow(ctpo_clip_power)
    rho_clipped = torch.exp(torch.clamp(log_rho, -ctpo_log_clip_low * scale, ctpo_log_clip_high * scale))
    loss_unclipped = -advantages * rho
    loss_clipped = -advantages * rho_clipped
    loss_ppo = torch.maximum(loss_unclipped, loss_clipped)
    negative = advantages < 0
    if ctpo_log_clip_c is not None:
        loss_dual_cap = -advantages * torch.exp(ctpo_log_clip_c * scale)
        loss_tok = torch.where(negative, torch.minimum(loss_ppo, loss_dual_cap), loss_ppo)
    else:
        loss_dual_cap = None
        loss_tok = loss_ppo
    if rollout_is_weights is not None:
        loss_tok = loss_tok * rollout_is_weights.detach()
    loss = agg_loss(loss_tok, response_mask, loss_agg_mode, norm_constant=norm_constant)

    with torch.no_grad():
        dual = (negative & (loss_ppo > loss_dual_cap)) if loss_dual_cap is not None else torch.zeros_like(valid)
        metrics = {
            "actor/pg_clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), response_mask),
            "actor/pg_clipfrac_lower": masked_mean(dual.float(), response_mask),
            "actor/ppo_kl": masked_mean(-log_ratio, response_mask),
            "actor/cum_log_ratio_absmax": torch.where(valid, cum_log_ratio.abs(), 0.0).amax()
            if valid.numel() else cum_log_ratio.new_zeros(()),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}
