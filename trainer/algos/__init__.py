"""Algorithm pieces for RL post-training: small pure torch functions, registered by name.

A config names each piece (``algorithm.adv_estimator: grpo``, ``actor.policy_loss: vanilla``,
``actor.kl_loss_type: k3``, ``actor.loss_agg_mode: token-mean``) and the trainer looks it up:

* advantages:      ``get_advantage(name)(token_level_rewards, response_mask, *, index=None,
  values=None, **cfg) -> (advantages, returns)``; built in: ``gae``, ``grpo``, ``rloo``,
  ``reinforce_plus_plus``, ``reinforce_plus_plus_baseline``, ``remax``.
* policy losses:   ``get_policy_loss(name)(old_log_prob, log_prob, advantages, response_mask,
  *, loss_agg_mode="token-mean", **cfg) -> (loss, metrics)``; built in: ``vanilla``/``ppo``,
  ``gspo``, ``ctpo``.
* KL penalties:    ``kl_penalty(log_prob, ref_log_prob, kind)``; ``k1``, ``k2``, ``k3``, ``abs``
  (+ aliases ``kl``, ``mse``, ``low_var_kl``).
* aggregation:     ``agg_loss(loss_mat, mask, mode, norm_constant=None)``.
* constraints:     ``LagrangeMultiplier`` (λ of a cost constraint, with state to checkpoint) and
  ``lagrangian_advantage(A_r, A_c, λ, mask)`` for Safe RLHF (PPO-Lagrangian).
* preference losses (reward models): ``get_preference_loss(name)(chosen_scores, rejected_scores,
  *, margin=0.0, **cfg) -> (loss, metrics)``; built in: ``bradley_terry``.

Conventions: tensors are ``[B, R]`` over response tokens, zero outside ``response_mask``;
metrics dicts map ``"<role>/<name>"`` to **detached 0-d tensors** (call ``float()`` to log).
Unknown names raise :class:`RegistryKeyError` (both a ``KeyError`` and a ``ValueError``)
listing the registered names and the closest matches.

Add your own::

    from hybridflow.trainer.algos import register_advantage

    @register_advantage("my_adv")
    def my_adv(token_level_rewards, response_mask, *, index=None, values=None, **cfg):
        ...
        return advantages, returns
"""
from .advantages import ADVANTAGES, gae_advantage, get_advantage, grpo_advantage, register_advantage
from .aggregation import AGG_MODES, agg_loss, agg_loss_modes, register_agg_mode
from .baselines import (  # registers "rloo", "reinforce_plus_plus(_baseline)", "remax"
    reinforce_plus_plus_advantage,
    reinforce_plus_plus_baseline_advantage,
    remax_advantage,
    rloo_advantage,
)
from .kl import (
    KL_PENALTIES,
    AdaptiveKLController,
    FixedKLController,
    apply_kl_penalty_to_reward,
    kl_penalty,
    make_kl_controller,
    register_kl_penalty,
)
from .lagrange import LagrangeMultiplier, lagrangian_advantage, make_lagrange
from .masked import masked_mean, masked_sum, masked_var, masked_whiten
from .policy_losses import POLICY_LOSSES, get_policy_loss, ppo_clip_loss, register_policy_loss
from .preference import (  # registers "bradley_terry"
    PREFERENCE_LOSSES,
    bradley_terry_loss,
    get_preference_loss,
    preference_metrics,
    register_preference_loss,
)
from .registry import Registry, RegistryKeyError, accepted_options
from .sequence_losses import ctpo_loss, gspo_loss  # registers "gspo", "ctpo" wherever algos is imported
from .shaping import add_overlong_penalty, groups_with_signal, overlong_penalty
from .value import entropy_from_logits, value_loss

__all__ = [
    # registries
    "Registry",
    "RegistryKeyError",
    "accepted_options",
    "ADVANTAGES",
    "register_advantage",
    "get_advantage",
    "gae_advantage",
    "grpo_advantage",
    "rloo_advantage",
    "reinforce_plus_plus_advantage",
    "reinforce_plus_plus_baseline_advantage",
    "remax_advantage",
    "POLICY_LOSSES",
    "register_policy_loss",
    "get_policy_loss",
    "ppo_clip_loss",
    "gspo_loss",
    "ctpo_loss",
    "overlong_penalty",
    "add_overlong_penalty",
    "groups_with_signal",
    "KL_PENALTIES",
    "register_kl_penalty",
    "kl_penalty",
    "AGG_MODES",
    "register_agg_mode",
    "agg_loss",
    "agg_loss_modes",
    # KL in the reward and its coefficient
    "apply_kl_penalty_to_reward",
    "FixedKLController",
    "AdaptiveKLController",
    "make_kl_controller",
    # reward models (preference pairs)
    "PREFERENCE_LOSSES",
    "register_preference_loss",
    "get_preference_loss",
    "bradley_terry_loss",
    "preference_metrics",
    # constrained RL (Safe RLHF)
    "LagrangeMultiplier",
    "lagrangian_advantage",
    "make_lagrange",
    # critic / entropy
    "value_loss",
    "entropy_from_logits",
    # masked helpers
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
]
