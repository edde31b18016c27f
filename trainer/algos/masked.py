"""Masked reductions over ``[B, R]`` response tensors — the one home of these helpers.

``mask`` is ``response_mask`` (1 on tokens that count, 0 on padding; float, long or bool).
Positions where ``mask == 0`` never contribute, even if ``x`` holds ``inf``/``nan`` there
(padding is often garbage), and an empty mask gives 0 rather than NaN.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["masked_sum", "masked_mean", "masked_var", "masked_whiten"]


def _masked_values(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(x * mask with padding forced to exactly 0, mask as x's dtype)``."""
    m = mask.to(dtype=x.dtype if x.is_floating_point() else torch.float32)
    xm = torch.where(mask != 0, x * m, torch.zeros((), dtype=m.dtype, device=x.device))
    return xm, m


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """``sum_i x_i * m_i`` over ``dim`` (all elements when ``dim`` is None)."""
    xm, _ = _masked_values(x, mask)
    return xm.sum() if dim is None else xm.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """``sum_i x_i m_i / sum_i m_i`` over ``dim``; 0 where the mask is empty (never NaN)."""
    xm, m = _masked_values(x, mask)
    if dim is None:
        return xm.sum() / m.sum().clamp_min(1e-8)
    return xm.sum(dim=dim) / m.sum(dim=dim).clamp_min(1e-8)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked elements of ``x`` (all of them, one scalar).

    ``var = sum_i m_i (x_i - mu)^2 / N``, times the Bessel correction ``N / (N - 1)`` when
    ``unbiased`` and ``N = sum_i m_i > 1`` (like ``torch.var``'s default). 0 for an empty mask.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        # N <= 1 leaves var at 0 anyway; clamping avoids a host sync on ``if n > 1``.
        n = mask.to(var.dtype).sum()
        var = var * n / (n - 1).clamp_min(1.0)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise ``x`` by the statistics of its masked elements.

    ``y = (x - mu) / sqrt(var + eps)`` with ``mu``, ``var`` from :func:`masked_mean` and the
    unbiased :func:`masked_var`; with ``shift_mean=False`` the mean is added back
    (``y = (x - mu) / sqrt(var + eps) + mu``). Values outside the mask are returned as computed
    (not zeroed); multiply by the mask if they must be 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    return y if shift_mean else y + mean
