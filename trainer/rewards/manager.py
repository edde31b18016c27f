"""Scoring a batch of responses with a reward function, with failure handling.

``RewardManager(fn)(prompts, responses, ground_truths, extras) -> (scores, metrics)``:

- ``scores``: ``np.ndarray`` float32 ``[B]``;
- ``metrics``: ``reward/num_failed`` and ``reward/<key>/mean`` for each extra numeric key that
  dict results carry (mean over the samples that returned it).

A sample fails when the function raises, or returns something other than a finite number or a
dict with a finite number under ``"score"``. A failed sample gets ``fallback_score``; the first
failure of a call is logged with its sample (truncated). With ``strict=True`` the first failure
raises ``RewardError`` naming the function, the sample index, the prompt/response (truncated) and
the exception or returned value.
"""
from __future__ import annotations

import inspect
import logging
import math
import numbers
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np
import torch

from hybridflow.trainer.rewards.loader import RewardError, function_name, is_batch_reward, load_reward_function

logger = logging.getLogger("hybridflow.rewards")

_TRUNCATE = 200


def _short(value: Any, limit: int = _TRUNCATE) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... (+{len(text) - limit} chars)"


def _as_number(value: Any) -> float | None:
    """A finite float from a Python/numpy/torch scalar, else None."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if (value.size if isinstance(value, np.ndarray) else value.numel()) != 1:
            return None
        value = value.item()
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    return None


class _Failure:
    def __init__(self, index: int, reason: str, exc: BaseException | None = None):
        self.index, self.reason, self.exc = index, reason, exc


class RewardManager:
    """Apply a reward function (callable or spec, see ``load_reward_function``) to batches.

    ``num_workers > 1`` scores per-sample functions in a thread pool (useful when the function
    waits on I/O, e.g. a sandbox or a remote judge); batch functions are always called once.
    """

    def __init__(self, fn: Callable | str, *, fallback_score: float = 0.0, strict: bool = False,
                 num_workers: int = 1):
        self.fn = load_reward_function(fn)
        self.name = function_name(self.fn)
        self.fallback_score = float(fallback_score)
        self.strict = strict
        self.num_workers = max(1, int(num_workers))
        self.is_batch = is_batch_reward(self.fn)
        self._accepts_all, self._accepted = self._extra_names(self.fn)

    @staticmethod
    def _extra_names(fn: Callable) -> tuple[bool, set[str]]:
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            return True, set()
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return True, set()
        named = {p.name for p in params[3:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        return False, named

    def _filter(self, extras: dict) -> dict:
        return extras if self._accepts_all else {k: v for k, v in extras.items() if k in self._accepted}

    # ------------------------------------------------------------------------- calling
    def __call__(self, prompts: Sequence[str], responses: Sequence[str], ground_truths: Sequence[Any],
                 extras: dict[str, Sequence[Any]] | None = None) -> tuple[np.ndarray, dict]:
        n = len(prompts)
        extras = {k: list(v) for k, v in (extras or {}).items()}
        for key, column in [("responses", responses), ("ground_truths", ground_truths), *extras.items()]:
            if len(column) != n:
                raise RewardError(f"reward function {self.name}: {key} has {len(column)} entries, prompts has {n}")
        results = self._call_batch(prompts, responses, ground_truths, extras) if self.is_batch else \
            self._call_each(prompts, responses, ground_truths, extras)

        scores = np.full(n, self.fallback_score, dtype=np.float32)
        extra_values: dict[str, list[float]] = {}
        failures: list[_Failure] = []
        for i, result in enumerate(results):
            if isinstance(result, _Failure):
                failures.append(result)
                continue
            score, reason = self._parse(result)
            if reason is not None:
                failures.append(_Failure(i, reason))
                continue
            scores[i] = score
            if isinstance(result, dict):
                for key, value in result.items():
                    number = _as_number(value)
                    if key != "score" and number is not None:
                        extra_values.setdefault(key, []).append(number)
        if failures:
            self._report(failures, n, prompts, responses)
        metrics: dict[str, float] = {"reward/num_failed": float(len(failures))}
        for key, values in extra_values.items():
            metrics[f"reward/{key}/mean"] = float(np.mean(values))
        return scores, metrics

    def _call_each(self, prompts, responses, ground_truths, extras) -> list:
        def one(i: int) -> Any:
            kwargs = self._filter({k: v[i] for k, v in extras.items()})
            try:
                return self.fn(prompts[i], responses[i], ground_truths[i], **kwargs)
            except Exception as exc:  # noqa: BLE001 - a user function may raise anything; handled below
                return _Failure(i, f"raised {type(exc).__name__}: {exc}", exc)

        if self.num_workers > 1 and len(prompts) > 1:
            with ThreadPoolExecutor(max_workers=self.num_workers) as pool:
                return list(pool.map(one, range(len(prompts))))
        results = []
        for i in range(len(prompts)):
            results.append(one(i))
            if self.strict and (isinstance(results[-1], _Failure) or self._parse(results[-1])[1] is not None):
                break  # strict: stop at the first failure; __call__ raises on it
        return results

    def _call_batch(self, prompts, responses, ground_truths, extras) -> list:
        n = len(prompts)
        try:
            results = self.fn(list(prompts), list(responses), list(ground_truths), **self._filter(extras))
        except Exception as exc:  # noqa: BLE001 - a failing batch call fails every sample of the batch
            return [_Failure(i, f"(batch call) raised {type(exc).__name__}: {exc}", exc) for i in range(n)]
        if isinstance(results, (np.ndarray, torch.Tensor)):
            results = results.tolist()
        if not isinstance(results, (list, tuple)) or len(results) != n:
            got = f"{len(results)} results" if isinstance(results, (list, tuple)) else type(results).__name__
            raise RewardError(f"batch reward function {self.name} must return a list of {n} results "
                              f"(one per sample), got {got}")
        return list(results)

    @staticmethod
    def _parse(result: Any) -> tuple[float, str | None]:
        if isinstance(result, dict):
            if "score" not in result:
                return 0.0, f"returned a dict without 'score' (keys: {sorted(map(str, result))})"
            value = _as_number(result["score"])
            return (value, None) if value is not None else (0.0, f"returned score {_short(result['score'])}, "
                                                                 "not a finite number")
        value = _as_number(result)
        if value is None:
            return 0.0, f"returned {_short(result)} ({type(result).__name__}), not a finite number or a dict with 'score'"
        return value, None

    def _report(self, failures: list[_Failure], n: int, prompts, responses) -> None:
        first = failures[0]
        sample = (f"sample {first.index}: prompt={_short(prompts[first.index])!r} "
                  f"response={_short(responses[first.index])!r}")
        if self.strict:
            raise RewardError(f"reward function {self.name} failed on {sample}: {first.reason}") from first.exc
        logger.warning("reward function %s failed on %d of %d samples (scored %s); first failure, %s: %s",
                       self.name, len(failures), n, self.fallback_score, sample, first.reason)


def scores_to_token_level(scores: Any, response_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` scores → ``[B, R]`` float32 tensor with each score on the row's last response
    token where ``response_mask`` is nonzero; rows with an empty mask are all zero."""
    mask = response_mask != 0
    batch, width = mask.shape
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().to(device=mask.device, dtype=torch.float32).reshape(-1)
    else:
        scores = torch.as_tensor(np.asarray(scores, dtype=np.float32), device=mask.device).reshape(-1)
    if scores.shape[0] != batch:
        raise ValueError(f"scores_to_token_level: {scores.shape[0]} scores for a mask of {batch} rows")
    positions = torch.arange(width, device=mask.device).expand(batch, width)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=1).values if width else \
        torch.full((batch,), -1, device=mask.device)
    out = torch.zeros((batch, width), dtype=torch.float32, device=mask.device)
    rows = (last >= 0).nonzero().flatten()
    out[rows, last[rows]] = scores[rows]
    return out
