"""Controller-side steps of the RL loop that every recipe shares."""
from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from hybridflow import DataProto
from hybridflow.trainer.algos import apply_kl_penalty_to_reward, get_advantage


def assign_uids(prompts: DataProto, step: int) -> DataProto:
    """Give each prompt an id (``uid``) that its n samples share, for group baselines."""
    prompts.non_tensor_batch["uid"] = np.array([f"{step}-{i}" for i in range(len(prompts))], dtype=object)
    return prompts


def apply_reward_kl(batch: DataProto, algo_cfg, kl_ctrl) -> dict:
    """``token_level_rewards`` = scores, or scores − β·KL(actor ‖ ref) per token when
    ``algorithm.use_kl_in_reward`` (β from ``kl_ctrl``, which is then updated with the batch KL)."""
    scores = batch.batch["token_level_scores"]
    if not algo_cfg.get("use_kl_in_reward", False):
        batch.batch["token_level_rewards"] = scores
        return {}
    rewards, metrics = apply_kl_penalty_to_reward(scores, batch.batch["old_log_probs"], batch.batch["ref_log_probs"],
                                                  batch.batch["response_mask"], kl_ctrl.value,
                                                  algo_cfg.get("kl_penalty", "k1"))
    batch.batch["token_level_rewards"] = rewards
    kl_ctrl.update(float(metrics["actor/reward_kl_penalty"]), n_steps=len(batch))
    return {k: float(v) for k, v in metrics.items()}


def compute_advantages(batch: DataProto, algo_cfg, kl_ctrl=None, **extra) -> dict:
    """Fill ``token_level_rewards``, ``advantages`` and ``returns`` with the estimator named by
    ``algorithm.adv_estimator`` (the rest of the ``algorithm`` section is passed as its options, then
    ``extra``: per-batch inputs that are not config, e.g. ReMax's ``baseline_scores``)."""
    metrics = apply_reward_kl(batch, algo_cfg, kl_ctrl)
    estimator = get_advantage(algo_cfg.adv_estimator)
    plain = OmegaConf.to_container(algo_cfg, resolve=True) if isinstance(algo_cfg, DictConfig) else dict(algo_cfg)
    options = {k: v for k, v in plain.items() if not isinstance(v, dict) and k != "adv_estimator"}
    values = batch.batch["values"] if "values" in batch.batch.keys() else None
    with torch.no_grad():
        adv, ret = estimator(batch.batch["token_level_rewards"], batch.batch["response_mask"],
                             index=batch.non_tensor_batch["uid"], values=values, **{**options, **extra})
    batch.batch["advantages"], batch.batch["returns"] = adv, ret
    return metrics
