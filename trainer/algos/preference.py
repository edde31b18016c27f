"""Preference losses for reward models: learn a scalar score from (chosen, rejected) pairs.

Contract (registry ``PREFERENCE_LOSSES``, config key ``rm.loss`` of ``recipes/reward_model.yaml``)::

    fn(chosen_scores, rejected_scores, *, margin=0.0, **cfg) -> (loss, metrics)

``chosen_scores`` / ``rejected_scores`` are ``[N]`` float tensors, the reward model's score of the
preferred and of the other response to the same prompt (pair ``i`` is element ``i`` of both).
``loss`` is a 0-d tensor (a mean over the ``N`` pairs, so micro-batches weight it by rows);
``metrics`` map ``"rm/<name>"`` to detached 0-d tensors. Register your own with
``@register_preference_loss("name")``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Tuple, Union

import torch
import torch.nn.functional as F

from .registry import Registry

__all__ = ["PREFERENCE_LOSSES", "register_preference_loss", "get_preference_loss", "bradley_terry_loss",
           "preference_metrics"]

PREFERENCE_LOSSES = Registry("preference loss")


def register_preference_loss(name: str) -> Callable:
    """Decorator registering a preference loss under ``name`` (see module doc for the signature)."""
    return PREFERENCE_LOSSES.register(name)


def get_preference_loss(name: str) -> Callable:
    """The preference loss registered as ``name``; unknown names raise with the closest matches."""
    return PREFERENCE_LOSSES.get(name)


def _check_pairs(chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    if chosen.ndim != 1 or chosen.shape != rejected.shape:
        raise ValueError(f"preference loss: chosen and rejected scores must be 1-D tensors of the same length, "
                         f"got {list(chosen.shape)} and {list(rejected.shape)}")
    if chosen.numel() == 0:
        raise ValueError("preference loss: no pairs (empty score tensors)")


def preference_metrics(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Detached pair metrics, with ``d_i = r_c,i − r_r,i``:

    * ``rm/accuracy`` = mean_i ( [d_i > 0] + 0.5·[d_i = 0] ) — a tie counts half (a coin flip);
    * ``rm/margin`` = mean_i d_i;
    * ``rm/chosen_score``, ``rm/rejected_score``: the mean scores.
    """
    _check_pairs(chosen_scores, rejected_scores)
    with torch.no_grad():
        diff = chosen_scores.float() - rejected_scores.float()
        accuracy = (diff > 0).float().mean() + 0.5 * (diff == 0).float().mean()
        return {"rm/accuracy": accuracy, "rm/margin": diff.mean(), "rm/chosen_score": chosen_scores.float().mean(),
                "rm/rejected_score": rejected_scores.float().mean()}


@register_preference_loss("bradley_terry")
def bradley_terry_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    *,
    margin: Union[float, torch.Tensor] = 0.0,
    **cfg: Any,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Bradley–Terry pairwise loss (Bradley & Terry 1952; the InstructGPT reward model,
    Ouyang et al. 2022), with the optional margin of Llama 2 (Touvron et al. 2023)::

        P(chosen ≻ rejected) = σ(r_c − r_r)
        loss = mean_i −log σ(r_c,i − r_r,i − m_i)  =  mean_i softplus(−(r_c,i − r_r,i − m_i))

    ``margin`` ``m``: a float for every pair or a ``[N]`` tensor (e.g. from graded preferences);
    the loss keeps pushing until the chosen score leads by ``m``. Equal scores and ``m = 0`` give
    ``log 2``; the softplus form is finite for any score gap. Metrics: :func:`preference_metrics`
    (accuracy, mean margin ``r_c − r_r``, mean scores) plus ``rm/loss``. Other ``cfg`` keys are
    ignored.
    """
    _check_pairs(chosen_scores, rejected_scores)
    if isinstance(margin, torch.Tensor) and margin.ndim and margin.shape != chosen_scores.shape:
        raise ValueError(f"bradley_terry_loss: margin must be a number or a tensor shaped like the scores "
                         f"{list(chosen_scores.shape)}, got {list(margin.shape)}")
    diff = chosen_scores - rejected_scores - margin
    loss = F.softplus(-diff).mean()
    metrics = preference_metrics(chosen_scores, rejected_scores)
    metrics["rm/loss"] = loss.detach()
    return loss, metrics
