"""Reward shaping and sample filtering of DAPO (Yu et al. 2025, "DAPO: An Open-Source LLM
Reinforcement Learning System at Scale"), as small pure functions used by ``recipes/dapo.py``.

* :func:`overlong_penalty` / :func:`add_overlong_penalty`: the soft overlong punishment, a length
  penalty added to the reward of responses that run into the length limit.
* :func:`groups_with_signal`: dynamic sampling's filter, which keeps only the prompts whose
  samples did not all get the same score (a group of equal rewards has zero GRPO advantage and
  gives no gradient).
"""
from __future__ import annotations

from typing import Hashable, Sequence

import numpy as np
import torch

__all__ = ["overlong_penalty", "add_overlong_penalty", "groups_with_signal"]


def overlong_penalty(response_length: torch.Tensor, max_length: int, buffer_length: int,
                     penalty_factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment of a response of length ``L`` (``[B]``, in tokens)::

        R_len(L) = 0                                    if L <= L_max - L_cache
                 = ((L_max - L_cache) - L) / L_cache    if L_max - L_cache < L <= L_max
                 = -1                                   if L > L_max
        penalty  = penalty_factor * R_len(L)

    ``L_max = max_length``, ``L_cache = buffer_length`` (the last ``L_cache`` tokens before the
    limit are the buffer in which the penalty grows linearly from 0 to -1). ``buffer_length`` 0
    disables the penalty (all zeros). Returns a float tensor shaped like ``response_length``.
    """
    if buffer_length < 0 or buffer_length > max_length:
        raise ValueError(f"overlong_penalty: buffer_length must be in [0, max_length={max_length}], "
                         f"got {buffer_length}")
    length = response_length.to(torch.float32)
    if buffer_length == 0:
        return torch.zeros_like(length)
    expected = max_length - buffer_length
    r = ((expected - length) / buffer_length).clamp(min=-1.0, max=0.0)
    return float(penalty_factor) * r


def add_overlong_penalty(token_level_scores: torch.Tensor, response_mask: torch.Tensor, max_length: int,
                         buffer_length: int, penalty_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores + penalty on each row's last response token, penalty [B])``.

    ``L = response_mask.sum(-1)`` (EOS included, as the sampler counts it). The penalty is added
    where the score sits, the last masked position of the row; a row with an empty mask is left
    unchanged. The input is not modified.
    """
    valid = response_mask != 0
    penalty = overlong_penalty(valid.sum(dim=-1), max_length, buffer_length, penalty_factor)
    penalty = torch.where(valid.any(dim=-1), penalty, torch.zeros_like(penalty)).to(token_level_scores.dtype)
    positions = torch.arange(valid.shape[-1], device=valid.device).expand_as(valid)
    last = torch.where(valid, positions, -1).amax(dim=-1).clamp_min(0)
    shaped = token_level_scores.clone()
    shaped[torch.arange(len(last), device=last.device), last] += penalty
    return shaped, penalty


def groups_with_signal(scores: torch.Tensor | Sequence[float], index: Sequence[Hashable]) -> np.ndarray:
    """Boolean ``[B]``: True for the rows whose group (rows sharing ``index[b]``, the ``uid``)
    holds at least two different scores. A group whose scores are all equal (all correct, all
    wrong, or a single sample) has no signal for a group baseline and is dropped by dynamic
    sampling. Exact comparison: filter on the task score (accuracy), not on a shaped reward.
    """
    values = torch.as_tensor(scores).detach().double().cpu().numpy()
    if len(values) != len(index):
        raise ValueError(f"groups_with_signal: {len(values)} scores but {len(index)} group ids")
    low: dict = {}
    high: dict = {}
    for g, v in zip(index, values):
        low[g] = min(low.get(g, v), v)
        high[g] = max(high.get(g, v), v)
    return np.array([high[g] > low[g] for g in index], dtype=bool)
