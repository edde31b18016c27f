"""Constrained RL with a Lagrange multiplier: PPO-Lagrangian, as in Safe RLHF (Dai et al. 2024,
"Safe RLHF: Safe Reinforcement Learning from Human Feedback").

The policy maximises the expected reward ``J_r`` while keeping the expected episode cost ``J_c``
at most a threshold ``d``. The Lagrangian relaxation is a min-max game::

    min_{λ ≥ 0} max_θ  J_r(θ) − λ · (J_c(θ) − d)

solved by alternating a dual step on ``λ`` (:class:`LagrangeMultiplier`) with a PPO step on the
actor whose advantage is :func:`lagrangian_advantage` ``(A_r − λ·A_c) / (1 + λ)``; ``A_r`` and
``A_c`` come from a reward critic and a cost critic (any registered estimator, e.g. ``gae``).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Union

import torch

__all__ = ["LagrangeMultiplier", "lagrangian_advantage", "make_lagrange"]


class LagrangeMultiplier:
    """The multiplier ``λ ≥ 0`` of the cost constraint ``J_c ≤ threshold``, updated by projected
    gradient ascent on the dual (the gradient of the Lagrangian in ``λ`` is ``J_c − d``)::

        λ ← min(λ_max, max(0, λ + lr · (mean episode cost − threshold)))

    so ``λ`` grows while the constraint is violated and shrinks (to exactly 0) once it holds.
    ``max_value`` (``λ_max``, None: unbounded) caps it. State to checkpoint: :meth:`state_dict`
    (``{"value": λ}``); the hyper-parameters come from the config and may change on resume.
    """

    def __init__(self, threshold: float, lr: float, init: float = 0.0, max_value: Optional[float] = None):
        for name, value in (("threshold", threshold), ("lr", lr), ("init", init)):
            if not math.isfinite(float(value)):
                raise ValueError(f"LagrangeMultiplier: {name} must be a finite number, got {value!r}")
        if float(lr) < 0:
            raise ValueError(f"LagrangeMultiplier: lr must be >= 0, got {lr}")
        if float(init) < 0:
            raise ValueError(f"LagrangeMultiplier: init must be >= 0 (λ multiplies a ≤ constraint), got {init}")
        if max_value is not None and float(max_value) < float(init):
            raise ValueError(f"LagrangeMultiplier: max_value {max_value} is below init {init}")
        self.threshold, self.lr = float(threshold), float(lr)
        self.max_value = None if max_value is None else float(max_value)
        self.value = float(init)

    def update(self, mean_cost: Any) -> Dict[str, float]:
        """One dual step from the batch's mean episode cost (a float or 0-d tensor); returns
        ``lagrange/lambda`` (after the step), ``lagrange/cost_gap`` (``J_c − d``)."""
        cost = float(mean_cost)
        if not math.isfinite(cost):
            raise ValueError(f"LagrangeMultiplier.update: mean episode cost is {cost}")
        gap = cost - self.threshold
        value = max(0.0, self.value + self.lr * gap)
        self.value = value if self.max_value is None else min(value, self.max_value)
        return {"lagrange/lambda": self.value, "lagrange/cost_gap": gap}

    def state_dict(self) -> Dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        value = float(state["value"])
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"LagrangeMultiplier.load_state_dict: λ must be a finite number >= 0, got {value}")
        self.value = value

    def __repr__(self) -> str:
        return (f"LagrangeMultiplier(value={self.value}, threshold={self.threshold}, lr={self.lr}, "
                f"max_value={self.max_value})")


_KEYS = ("threshold", "lr", "init", "max_value")


def make_lagrange(cfg: Mapping[str, Any]) -> LagrangeMultiplier:
    """A :class:`LagrangeMultiplier` from a mapping (e.g. ``algorithm.lagrange``) with keys
    ``threshold`` (required), ``lr`` (required), ``init`` (default 0.0), ``max_value`` (default
    None); an unknown or missing key raises ``ValueError`` naming it."""
    params = dict(cfg.items())
    unknown = sorted(set(params) - set(_KEYS))
    if unknown:
        raise ValueError(f"unknown Lagrange multiplier key(s) {unknown}; valid keys: {', '.join(_KEYS)}")
    missing = [k for k in ("threshold", "lr") if params.get(k) is None]
    if missing:
        raise ValueError(f"the Lagrange multiplier needs {' and '.join(missing)}")
    return LagrangeMultiplier(params["threshold"], params["lr"], params.get("init") or 0.0, params.get("max_value"))


def lagrangian_advantage(
    reward_advantages: torch.Tensor,
    cost_advantages: torch.Tensor,
    lam: Union[float, torch.Tensor],
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """The actor's advantage in PPO-Lagrangian::

        A = (A_r − λ · A_c) / (1 + λ)          (zero outside response_mask)

    the advantage of the Lagrangian ``r − λ·c``, divided by ``1 + λ`` so its scale stays that of
    one advantage however large ``λ`` grows. ``λ = 0`` gives ``A_r``; ``λ → ∞`` tends to ``−A_c``.
    All ``[B, R]``; ``lam`` a float or 0-d tensor ``≥ 0``.
    """
    lam = float(lam)
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lagrangian_advantage: λ must be a finite number >= 0, got {lam}")
    if reward_advantages.shape != cost_advantages.shape or reward_advantages.shape != response_mask.shape:
        raise ValueError(
            "lagrangian_advantage: reward_advantages, cost_advantages and response_mask must have the same [B, R] "
            f"shape, got {tuple(reward_advantages.shape)}, {tuple(cost_advantages.shape)}, "
            f"{tuple(response_mask.shape)}")
    with torch.no_grad():
        combined = (reward_advantages - lam * cost_advantages) / (1.0 + lam)
        return torch.where(response_mask != 0, combined, torch.zeros_like(combined))
