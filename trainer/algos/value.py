"""Critic loss (PPO value clipping) and the policy entropy used for the entropy bonus."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .aggregation import agg_loss
from .masked import masked_mean

__all__ = ["value_loss", "entropy_from_logits"]


def value_loss(
    vpreds: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: Optional[float],
    loss_agg_mode: str = "token-mean",
    norm_constant: Optional[float] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Clipped value loss (the PPO baselines implementation; Schulman et al. 2017,
    "Proximal Policy Optimization Algorithms")::

        v_clip = V_old + clamp(V - V_old, -c, c)
        l      = 0.5 * max((V - R)^2, (v_clip - R)^2)
        loss   = agg_loss(l, response_mask, loss_agg_mode, norm_constant)

    ``c = cliprange_value``; ``None`` disables clipping (``l = 0.5 (V - R)^2``).

    Returns ``(loss, metrics)``; metrics are detached 0-d tensors:

    * ``critic/vf_clipfrac``: masked fraction of tokens where the clipped term is the larger
      (``(v_clip - R)^2 > (V - R)^2``), i.e. where clipping cuts the gradient.
    """
    err_unclipped = (vpreds - returns).square()
    if cliprange_value is None:
        err_clipped = err_unclipped
    else:
        v_clipped = old_values + (vpreds - old_values).clamp(-cliprange_value, cliprange_value)
        err_clipped = (v_clipped - returns).square()
    loss_tok = 0.5 * torch.maximum(err_unclipped, err_clipped)
    loss = agg_loss(loss_tok, response_mask, loss_agg_mode, norm_constant=norm_constant)
    with torch.no_grad():
        clipfrac = masked_mean((err_clipped > err_unclipped).float(), response_mask)
    return loss, {"critic/vf_clipfrac": clipfrac.detach()}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last dim: ``[..., V] -> [...]``.

    ``H = -sum_i p_i log p_i = logsumexp(z) - sum_i p_i z_i`` with ``p = softmax(z)``. This form
    needs only ``p`` as a vocabulary-sized intermediate (no separate ``log_softmax`` tensor).
    Logits must be finite: mask vocabulary entries with a large negative number, not ``-inf``
    (``0 * -inf`` is NaN).

    The actor applies the bonus: ``loss = pg_loss - entropy_coeff * agg_loss(H, mask, mode)``.
    """
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)
