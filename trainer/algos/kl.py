"""KL penalties between the actor and the reference policy, and KL coefficient controllers.

Per-token estimators of ``KL(pi || pi_ref)`` from samples ``y ~ pi`` (see John Schulman's note
"Approximating KL Divergence"), with ``d = log pi(y) - log pi_ref(y)``:

* ``k1`` (alias ``kl``):          ``d``                        unbiased, high variance, can be < 0
* ``abs``:                        ``|d|``
* ``k2`` (alias ``mse``):         ``0.5 d^2``                  biased, low variance, >= 0
* ``k3`` (alias ``low_var_kl``):  ``exp(-d) + d - 1``          unbiased, low variance, >= 0

The penalty can enter the reward (:func:`apply_kl_penalty_to_reward`, PPO-RLHF style) or the
loss (the actor adds ``kl_coef * agg_loss(kl_penalty(...))``, GRPO style); both use
:func:`kl_penalty`. Register more kinds with ``@register_kl_penalty("name")``; an entry is
``fn(log_prob, ref_log_prob) -> [B, R]``.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from .masked import masked_mean
from .registry import Registry

__all__ = [
    "KL_PENALTIES",
    "register_kl_penalty",
    "kl_penalty",
    "apply_kl_penalty_to_reward",
    "FixedKLController",
    "AdaptiveKLController",
    "make_kl_controller",
]

KL_PENALTIES = Registry("KL penalty kind")


def register_kl_penalty(name: str) -> Callable:
    """Decorator registering ``fn(log_prob, ref_log_prob) -> [B, R]`` as KL kind ``name``."""
    return KL_PENALTIES.register(name)


@register_kl_penalty("kl")
@register_kl_penalty("k1")
def _kl_k1(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """``k1 = log pi - log pi_ref``."""
    return log_prob - ref_log_prob


@register_kl_penalty("abs")
def _kl_abs(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """``|log pi - log pi_ref|``."""
    return (log_prob - ref_log_prob).abs()


@register_kl_penalty("mse")
@register_kl_penalty("k2")
def _kl_k2(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """``k2 = 0.5 (log pi - log pi_ref)^2``."""
    return 0.5 * (log_prob - ref_log_prob).square()


@register_kl_penalty("low_var_kl")
@register_kl_penalty("k3")
def _kl_k3(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """``k3 = exp(x) - x - 1`` with ``x = log pi_ref - log pi``, clamped to ``[-10, 10]``.

    ``x`` is first clamped to ``[-20, 20]`` so ``exp`` cannot overflow to ``inf`` (whose
    gradient through the final clamp would be ``0 * inf = NaN``).
    """
    x = (ref_log_prob - log_prob).clamp(-20.0, 20.0)
    return (torch.exp(x) - x - 1.0).clamp(-10.0, 10.0)


def kl_penalty(
    log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kind: str = "k1"
) -> torch.Tensor:
    """Per-token KL estimate ``[B, R]`` of kind ``k1 | k2 | k3 | abs`` (aliases ``kl``, ``mse``,
    ``low_var_kl``); see the module doc for the formulas. Differentiable in ``log_prob``."""
    return KL_PENALTIES.resolve(kind)(log_prob, ref_log_prob)


def apply_kl_penalty_to_reward(
    token_level_scores: torch.Tensor,
    log_prob: torch.Tensor,
    ref_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    kind: str = "k1",
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """In-reward KL penalty (Ziegler et al. 2019; Ouyang et al. 2022, "Training language models
    to follow instructions with human feedback")::

        token_level_rewards = token_level_scores - beta * kl_penalty(log_prob, ref, kind) * mask

    Returns ``(token_level_rewards, metrics)`` with metrics (detached 0-d float tensors):

    * ``actor/reward_kl_penalty``: the batch KL, ``mean_b (masked mean_t of kl[b, t])`` over
      rows with at least one valid token. Feed it to ``kl_ctrl.update(current_kl, n_steps=B)``.
    * ``actor/reward_kl_penalty_coeff``: ``beta``.

    Computed without gradient (rewards are data, not part of the graph).
    """
    with torch.no_grad():
        kl = kl_penalty(log_prob.float(), ref_log_prob.float(), kind)
        kl = torch.where(response_mask != 0, kl * response_mask.float(), 0.0)
        rewards = token_level_scores - (kl_coef * kl).to(token_level_scores.dtype)
        row_kl = masked_mean(kl, response_mask, dim=-1)
        row_ok = (response_mask != 0).any(dim=-1)
        current_kl = masked_mean(row_kl, row_ok)
    metrics = {
        "actor/reward_kl_penalty": current_kl.detach(),
        "actor/reward_kl_penalty_coeff": torch.tensor(float(kl_coef), device=current_kl.device),
    }
    return rewards, metrics


class FixedKLController:
    """Constant KL coefficient: ``value`` never changes."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: Any = None, n_steps: int = 0) -> None:
        """No-op (kept for interface parity with :class:`AdaptiveKLController`)."""

    def __repr__(self) -> str:
        return f"FixedKLController(kl_coef={self.value})"


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
    Preferences"): a proportional controller steering the observed KL toward ``target_kl``::

        e     = clip(current_kl / target_kl - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n_steps / horizon)

    ``n_steps`` is the number of samples (rows) seen since the last update, so ``horizon`` is
    measured in samples.
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: float):
        if target_kl <= 0:
            raise ValueError(f"AdaptiveKLController: target_kl must be > 0, got {target_kl}")
        if horizon <= 0:
            raise ValueError(f"AdaptiveKLController: horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target_kl)
        self.horizon = float(horizon)

    def update(self, current_kl: Any, n_steps: int) -> None:
        """Update ``value`` from the observed KL (a float or 0-d tensor) over ``n_steps`` rows."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def __repr__(self) -> str:
        return (
            f"AdaptiveKLController(value={self.value}, target_kl={self.target}, "
            f"horizon={self.horizon})"
        )


_CTRL_KEYS = ("type", "kl_coef", "target_kl", "horizon")


def make_kl_controller(cfg: Optional[Mapping[str, Any]] = None, **overrides: Any):
    """Build a KL controller from a mapping (dict / omegaconf node) and/or keyword arguments.

    Keys: ``type`` (``"fixed"`` (default) or ``"adaptive"``), ``kl_coef`` (default 0.001; the
    initial coefficient for ``adaptive``), ``target_kl`` and ``horizon`` (required for
    ``adaptive``). Keyword arguments override the mapping. Unknown keys raise ``ValueError``
    with the closest valid key, so a typo cannot silently fall back to a default.

    Examples: ``make_kl_controller({"type": "fixed", "kl_coef": 0.01})``,
    ``make_kl_controller(type="adaptive", kl_coef=0.1, target_kl=6.0, horizon=10000)``.
    """
    params: Dict[str, Any] = dict(cfg.items()) if cfg is not None else {}
    params.update(overrides)
    for key in params:
        if key not in _CTRL_KEYS:
            close = difflib.get_close_matches(str(key), _CTRL_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"unknown KL controller key {key!r}{hint}; valid keys: {', '.join(_CTRL_KEYS)}"
            )
    kind = params.get("type", "fixed")
    kl_coef = params.get("kl_coef", 0.001)
    if kind == "fixed":
        return FixedKLController(kl_coef)
    if kind == "adaptive":
        missing = [k for k in ("target_kl", "horizon") if params.get(k) is None]
        if missing:
            raise ValueError(f"adaptive KL controller needs {' and '.join(missing)}")
        return AdaptiveKLController(kl_coef, params["target_kl"], params["horizon"])
    raise ValueError(f"unknown KL controller type {kind!r}; expected 'fixed' or 'adaptive'")
