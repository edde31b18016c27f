"""Loss aggregation: how a per-token loss matrix ``[B, R]`` becomes one scalar.

The choice matters for long-vs-short response bias: ``token-mean`` weights every token
equally (long responses weigh more), ``seq-mean-token-mean`` weights every sequence equally
(the original GRPO paper), ``seq-mean-token-sum-norm`` divides by a constant so the gradient
has no length normalisation at all (Dr. GRPO, "Understanding R1-Zero-Like Training: A Critical
Perspective").

Rows whose mask is all zero (e.g. padding rows) are excluded from every sequence mean, and
an all-zero mask aggregates to 0, never NaN.

``norm_constant`` replaces the denominator of any mode. Pass the count over the whole
mini-batch (global token count for ``token-mean``, global number of non-empty rows for the
``seq-mean-*`` modes) when a mini-batch is split into micro-batches for gradient accumulation
and each micro-batch loss is summed: the accumulated gradient then equals that of the mean
over the mini-batch.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

from .masked import masked_sum
from .registry import Registry

__all__ = ["AGG_MODES", "register_agg_mode", "agg_loss", "agg_loss_modes"]

AGG_MODES = Registry("loss aggregation mode")


def register_agg_mode(name: str) -> Callable:
    """Decorator: register ``fn(loss_mat, mask, norm_constant) -> scalar`` as mode ``name``."""
    return AGG_MODES.register(name)


def agg_loss_modes() -> List[str]:
    return AGG_MODES.names()


def _denominator(default: torch.Tensor, norm_constant) -> torch.Tensor:
    if norm_constant is None:
        return default.clamp_min(1.0)
    return torch.as_tensor(norm_constant, dtype=default.dtype, device=default.device)


@register_agg_mode("token-mean")
def _token_mean(loss_mat, mask, norm_constant=None):
    """``L = sum_{b,t} m_bt l_bt / sum_{b,t} m_bt``."""
    n_tokens = mask.to(loss_mat.dtype).sum()
    return masked_sum(loss_mat, mask) / _denominator(n_tokens, norm_constant)


@register_agg_mode("seq-mean-token-sum")
def _seq_mean_token_sum(loss_mat, mask, norm_constant=None):
    """``L = (1 / |S|) sum_{b in S} sum_t m_bt l_bt``, ``S`` = rows with at least one token."""
    row_sum = masked_sum(loss_mat, mask, dim=-1)
    n_rows = (mask != 0).any(dim=-1).to(loss_mat.dtype).sum()
    return row_sum.sum() / _denominator(n_rows, norm_constant)


@register_agg_mode("seq-mean-token-mean")
def _seq_mean_token_mean(loss_mat, mask, norm_constant=None):
    """``L = (1 / |S|) sum_{b in S} (sum_t m_bt l_bt / sum_t m_bt)``, ``S`` = non-empty rows."""
    row_sum = masked_sum(loss_mat, mask, dim=-1)
    row_count = mask.to(loss_mat.dtype).sum(dim=-1)
    row_mean = row_sum / row_count.clamp_min(1e-8)  # empty rows: 0 / eps = 0
    n_rows = (mask != 0).any(dim=-1).to(loss_mat.dtype).sum()
    return row_mean.sum() / _denominator(n_rows, norm_constant)


@register_agg_mode("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(loss_mat, mask, norm_constant=None):
    """``L = sum_{b,t} m_bt l_bt / C``, ``C = norm_constant`` (default ``R``, the number of
    response columns), as in Dr. GRPO: every token's gradient is scaled by the same constant,
    independent of its sequence's length.

    The batch dimension is summed, not averaged; pass ``norm_constant = B * R`` (or its
    global equivalent) for a per-sequence scale like Dr. GRPO's ``1/G`` factor.
    """
    total = masked_sum(loss_mat, mask)
    if norm_constant is None:
        norm_constant = loss_mat.shape[-1]
    return total / torch.as_tensor(norm_constant, dtype=total.dtype, device=total.device)


def agg_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    norm_constant: Optional[float] = None,
) -> torch.Tensor:
    """Aggregate a ``[B, R]`` per-token loss into a 0-d tensor (differentiable).

    Modes (``m`` = mask, ``l`` = loss_mat, ``S`` = rows with at least one masked token):

    * ``token-mean``:              ``sum_{b,t} m l / sum_{b,t} m``
    * ``seq-mean-token-sum``:      ``mean_{b in S} sum_t m l``
    * ``seq-mean-token-mean``:     ``mean_{b in S} (sum_t m l / sum_t m)``
    * ``seq-mean-token-sum-norm``: ``sum_{b,t} m l / C`` with ``C = norm_constant`` or ``R``

    ``norm_constant``, when given, replaces the denominator of every mode (see module doc).

    Raises:
        ValueError: unknown ``mode`` (the message lists the available modes).
    """
    if loss_mat.shape != mask.shape:
        raise ValueError(
            f"agg_loss: loss_mat shape {tuple(loss_mat.shape)} != mask shape {tuple(mask.shape)}"
        )
    fn = AGG_MODES.resolve(mode)
    return fn(loss_mat, mask, norm_constant=norm_constant)
