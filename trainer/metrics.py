"""Per-step metrics computed on the controller: stage timers, batch statistics, throughput.

Metric names follow the contract in DESIGN.md ("Metrics") and the columns of
docs/design/contracts.md. Every function returns a flat ``{name: float}`` dict; a metric whose
input column is missing from the batch is simply absent (never NaN, never an error).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Iterator, Mapping

import numpy as np
import torch

from hybridflow.protocol import DataProto

__all__ = ["Timer", "compute_data_metrics", "compute_throughput", "reduce_metrics"]


class Timer:
    """Wall-clock timer of the stages of one training step.

    ``with timer("gen"): ...`` adds the elapsed seconds to ``timing/gen_s`` (a stage timed several
    times in a step accumulates). The caller times the whole step with ``with timer("step")``,
    which yields ``timing/step_s``. :meth:`step_metrics` returns the step's dict and resets.
    """

    def __init__(self) -> None:
        self._elapsed: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not name or "/" in name:
            raise ValueError(f"Timer: stage name must be non-empty and contain no '/', got {name!r}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self._elapsed[name] = self._elapsed.get(name, 0.0) + time.perf_counter() - start

    def elapsed(self, name: str) -> float:
        """Seconds accumulated so far in this step for ``name`` (0.0 if never timed)."""
        return self._elapsed.get(name, 0.0)

    def step_metrics(self) -> dict[str, float]:
        """``{"timing/<stage>_s": seconds}`` for every stage timed since the last call; resets."""
        out = {f"timing/{name}_s": seconds for name, seconds in self._elapsed.items()}
        self._elapsed = {}
        return out


def _column(batch: DataProto, key: str) -> torch.Tensor | None:
    if batch.batch is None or key not in batch.batch.keys():
        return None
    return batch.batch[key]


def _response_mask(batch: DataProto) -> torch.Tensor | None:
    """``response_mask``, else the response part of ``attention_mask`` (needs ``responses``)."""
    mask = _column(batch, "response_mask")
    if mask is not None:
        return mask.float()
    attention, responses = _column(batch, "attention_mask"), _column(batch, "responses")
    if attention is not None and responses is not None:
        return attention[:, -responses.shape[1]:].float()
    return None


def _prompt_width(batch: DataProto) -> int | None:
    prompts, responses = _column(batch, "prompts"), _column(batch, "responses")
    if prompts is not None:
        return int(prompts.shape[1])
    attention = _column(batch, "attention_mask")
    if attention is not None and responses is not None:
        return int(attention.shape[1] - responses.shape[1])
    return None


def _stats(prefix: str, values: torch.Tensor, with_range: bool = True) -> dict[str, float]:
    values = values.detach().double()
    out = {f"{prefix}/mean": values.mean().item()}
    if with_range:
        out[f"{prefix}/max"] = values.max().item()
        out[f"{prefix}/min"] = values.min().item()
    return out


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return values.detach().double()[mask.to(values.device) > 0]


def compute_data_metrics(batch: DataProto) -> dict[str, float]:
    """Statistics of a rollout batch, from the columns present:

    - ``reward/mean|max|min``: per-row score ``token_level_scores.sum(-1)``;
      ``reward/rewards_mean``: mean of ``token_level_rewards.sum(-1)``;
    - ``response_length/mean|max|min``: ``response_mask.sum(-1)``; ``response_length/clip_ratio``:
      fraction of rows whose length equals R (hit the length limit);
    - ``prompt_length/mean``: ``attention_mask[:, :P].sum(-1)`` with ``P = prompts.shape[1]``;
    - ``advantages/mean|max|min``, ``returns/mean``, ``values/mean``: over tokens where
      ``response_mask`` is 1;
    - ``actor/kl_ref``: mean over those tokens of ``old_log_probs - ref_log_probs``.

    Without ``response_mask`` the response part of ``attention_mask`` is used as the mask.
    """
    if len(batch) == 0:
        return {}
    out: dict[str, float] = {}
    scores = _column(batch, "token_level_scores")
    if scores is not None:
        out.update(_stats("reward", scores.sum(-1)))
    rewards = _column(batch, "token_level_rewards")
    if rewards is not None:
        out["reward/rewards_mean"] = rewards.detach().double().sum(-1).mean().item()

    mask = _response_mask(batch)
    if mask is not None:
        lengths = mask.sum(-1)
        out.update(_stats("response_length", lengths))
        out["response_length/clip_ratio"] = (lengths == mask.shape[1]).double().mean().item()

    attention, width = _column(batch, "attention_mask"), _prompt_width(batch)
    if attention is not None and width is not None:
        out["prompt_length/mean"] = attention[:, :width].double().sum(-1).mean().item()

    if mask is None or not bool((mask > 0).any()):
        return out
    for key, prefix, with_range in (("advantages", "advantages", True),
                                    ("returns", "returns", False), ("values", "values", False)):
        column = _column(batch, key)
        if column is not None:
            out.update(_stats(prefix, _masked(column, mask), with_range))
    old, ref = _column(batch, "old_log_probs"), _column(batch, "ref_log_probs")
    if old is not None and ref is not None:
        out["actor/kl_ref"] = _masked(old - ref, mask).mean().item()
    return out


def compute_throughput(batch: DataProto, step_time_s: float, num_devices: int) -> dict[str, float]:
    """``throughput/total_tokens``: real (prompt + response) tokens of the batch, counted from
    ``attention_mask``; ``throughput/tokens_per_s``: that count / ``step_time_s`` / ``num_devices``
    (tokens per second per device). Empty dict when the batch has no ``attention_mask``."""
    if not step_time_s > 0:
        raise ValueError(f"compute_throughput: step_time_s must be > 0, got {step_time_s!r}")
    if int(num_devices) < 1:
        raise ValueError(f"compute_throughput: num_devices must be >= 1, got {num_devices!r}")
    attention = _column(batch, "attention_mask")
    if attention is None:
        return {}
    total = int(attention.sum().item())
    return {"throughput/total_tokens": float(total),
            "throughput/tokens_per_s": total / float(step_time_s) / int(num_devices)}


def _to_float(name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"reduce_metrics: metric {name!r} is a tensor of shape "
                             f"{tuple(value.shape)}; expected a scalar")
        return float(value.item())
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"reduce_metrics: metric {name!r} has non-numeric value {value!r}") from err


def reduce_metrics(metrics: Mapping[str, object]) -> dict[str, float]:
    """Mean of each list/tuple/array value (worker groups return one value per rank or micro-batch);
    scalars (python, numpy, 0-d or 1-element tensors) pass through as floats. An empty list gives
    no entry. NaN elements propagate (a NaN loss must stay visible)."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, (list, tuple, np.ndarray)) or (
                isinstance(value, torch.Tensor) and value.numel() != 1):
            flat = value.flatten().tolist() if isinstance(value, (np.ndarray, torch.Tensor)) else value
            items = [_to_float(name, v) for v in flat]
            if items:
                out[name] = math.fsum(items) / len(items)
        else:
            out[name] = _to_float(name, value)
    return out
