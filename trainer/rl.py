"""Controller-side steps of the RL loop that every recipe shares."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from hybridflow import DataProto
from hybridflow.trainer.algos import accepted_options, apply_kl_penalty_to_reward, get_advantage
from hybridflow.trainer.settings import AlgorithmSettings


def assign_uids(prompts: DataProto, step: int) -> DataProto:
    """Give each prompt an id (``uid``) that its n samples share, for group baselines."""
    prompts.non_tensor_batch["uid"] = np.array([f"{step}-{i}" for i in range(len(prompts))], dtype=object)
    return prompts


def sample_and_score(step, actor, reward, prompts: DataProto | None = None) -> DataProto:
    """How every on-policy dataflow starts, as timed stages of ``step``: ``gen`` (``rollout.n``
    samples of each prompt, default ``step.prompts``), ``reward`` (``token_level_scores``, the
    reward's metrics in ``meta_info``) and the actor's log-probs before the update
    (:func:`add_old_log_probs`). Returns the batch."""
    with step.stage("gen"):
        batch = actor.generate(step.prompts if prompts is None else prompts)
    with step.stage("reward"):
        batch.union(reward.compute_rewards(batch))
    return add_old_log_probs(step, actor, batch)


def add_old_log_probs(step, actor, batch: DataProto) -> DataProto:
    """The ``old_log_prob`` stage (``old_log_probs``, the π_old of the ratio) when the run's
    ``actor.old_log_prob`` resolved to ``recompute``; with ``update`` or ``rollout`` the update
    takes π_old from its own forward or from ``rollout_log_probs`` and nothing runs here
    (trainer/settings.py, ``OLD_LOG_PROB``)."""
    if step.run.settings.actor.old_log_prob == "recompute":
        with step.stage("old_log_prob"):
            batch.union(actor.compute_log_prob(batch))
    return batch


def apply_reward_kl(batch: DataProto, algo: AlgorithmSettings, kl_ctrl) -> dict:
    """``token_level_rewards`` = scores, or scores − β·KL(actor ‖ ref) per token when
    ``algorithm.use_kl_in_reward`` (β from ``kl_ctrl``, which is then updated with the batch KL)."""
    scores = batch.batch["token_level_scores"]
    if not algo.use_kl_in_reward:
        batch.batch["token_level_rewards"] = scores
        return {}
    rewards, metrics = apply_kl_penalty_to_reward(scores, batch.batch["old_log_probs"], batch.batch["ref_log_probs"],
                                                  batch.batch["response_mask"], kl_ctrl.value, algo.kl_penalty)
    batch.batch["token_level_rewards"] = rewards
    kl_ctrl.update(float(metrics["actor/reward_kl_penalty"]), n_steps=len(batch))
    return {k: float(v) for k, v in metrics.items()}


def _algorithm(algo) -> tuple[Any, dict]:
    """``(settings or a stand-in with the KL keys, estimator options)`` of the ``algorithm``
    section: typed settings, or a plain mapping (``adv_estimator`` and the estimator's options;
    ``use_kl_in_reward`` and ``kl_penalty`` when a KL term is in the reward)."""
    if isinstance(algo, AlgorithmSettings):
        return algo, algo.estimator_options()
    plain = OmegaConf.to_container(algo, resolve=True) if isinstance(algo, DictConfig) else dict(algo)
    options = {k: v for k, v in plain.items() if not isinstance(v, dict) and k != "adv_estimator"}
    kl = SimpleNamespace(adv_estimator=plain["adv_estimator"], use_kl_in_reward=bool(plain.get("use_kl_in_reward")),
                         kl_penalty=plain.get("kl_penalty"))
    return kl, options


def compute_advantages(batch: DataProto, algo, kl_ctrl=None, **extra) -> dict:
    """Fill ``token_level_rewards``, ``advantages`` and ``returns`` with the estimator named by
    ``algorithm.adv_estimator``. ``algo``: the run's :class:`AlgorithmSettings` (the estimator gets
    ``gamma``, ``lam``, ``norm_adv_by_std`` and the section's other scalar keys, those it takes)
    or a mapping of the same keys; ``extra``: per-batch inputs that are not config, e.g. ReMax's
    ``baseline_scores``. Returns the KL-penalty metrics (empty without KL in the reward)."""
    algo, options = _algorithm(algo)
    metrics = apply_reward_kl(batch, algo, kl_ctrl)
    estimator = get_advantage(algo.adv_estimator)
    values = batch.batch["values"] if "values" in batch.batch.keys() else None
    with torch.no_grad():
        adv, ret = estimator(batch.batch["token_level_rewards"], batch.batch["response_mask"],
                             index=batch.non_tensor_batch["uid"], values=values,
                             **accepted_options(estimator, {**options, **extra}))
    batch.batch["advantages"], batch.batch["returns"] = adv, ret
    return metrics
