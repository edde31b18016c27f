"""Rewards on the workers: a user reward function and/or a reward model.

``compute_rewards(batch)`` decodes each response (up to its mask), scores it, and returns
``token_level_scores`` ``[B, R]`` with the score on the last response token, plus reward metrics
in ``meta_info['metrics']``. With both a function and a model, the score is their sum.
The function is configured by ``reward.function`` (``path/to/file.py:fn`` or ``builtin:NAME``;
see docs/rewards.md); the model by ``reward.model_path`` (a value-head checkpoint; its score is
the value at the last real token). :class:`CostWorker` is the same role reading the ``cost``
section and returning ``token_level_costs`` (Safe RLHF's cost signal).
"""
from __future__ import annotations

import numpy as np
import torch

from hybridflow import DataProto, Dispatch, Role, Worker, register
from hybridflow.trainer.rewards import RewardManager, scores_to_token_level
from hybridflow.trainer.settings import RewardSettings, RLSettings
from hybridflow.workers.roles.common import build_engine


class RewardWorker(Worker):
    """``reward``: the section's settings; ``tokenizer_path``: the policy's checkpoint, whose
    tokenizer decodes the responses."""
    SECTION, OUTPUT = "reward", "token_level_scores"  # config section read, output key (CostWorker: others)

    def __init__(self, reward: RewardSettings, *, tokenizer_path: str):
        super().__init__()
        self.cfg = reward
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.manager = None if not reward.function else RewardManager(
            reward.function, fallback_score=reward.fallback_score, strict=reward.strict,
            num_workers=reward.num_workers)
        self.model = None
        if reward.model_path:
            self.init_distributed()
            self.model = build_engine(reward.model_path, reward, model_type="value", trainable=False)
        if self.manager is None and self.model is None:
            raise ValueError(f"{self.SECTION}: set {self.SECTION}.function (e.g. builtin:exact_match) and/or "
                             f"{self.SECTION}.model_path")

    @classmethod
    def role(cls, s: RLSettings) -> Role:
        return Role(cls, getattr(s, cls.SECTION), tokenizer_path=s.model.path)

    def decode_responses(self, data: DataProto) -> list[str]:
        lengths = data.batch["response_mask"].sum(-1).long().tolist()
        return [self.tokenizer.decode(ids[:n], skip_special_tokens=True)
                for ids, n in zip(data.batch["responses"].tolist(), lengths)]

    @register(dispatch=Dispatch.DP_COMPUTE_PROTO)
    def compute_rewards(self, data: DataProto) -> DataProto:
        scores = torch.zeros(len(data))
        metrics: dict = {}
        if self.manager is not None:
            extras = {k: list(v) for k, v in data.non_tensor_batch.items() if k not in ("raw_prompt", "ground_truth")}
            values, metrics = self.manager(list(data.non_tensor_batch["raw_prompt"]), self.decode_responses(data),
                                           list(data.non_tensor_batch.get("ground_truth", [None] * len(data))),
                                           extras)
            scores += torch.as_tensor(np.asarray(values, dtype=np.float32))
        if self.model is not None:
            rm = self.model.forward(data.batch.select("input_ids", "attention_mask", "position_ids"))["values"]
            last = data.batch["attention_mask"].long().cumsum(-1).argmax(-1)
            rm_scores = rm[torch.arange(len(data)), last]
            metrics[f"{self.SECTION}/model_score/mean"] = float(rm_scores.mean())
            scores += rm_scores
        token_scores = scores_to_token_level(scores, data.batch["response_mask"])
        metrics = {f"{self.SECTION}/{k.removeprefix('reward/')}": v for k, v in metrics.items()}
        return DataProto.from_dict({self.OUTPUT: token_scores}, meta_info={"metrics": metrics})


class CostWorker(RewardWorker):
    """Safe RLHF's cost: ``cost.function`` and/or ``cost.model_path``, scored like the reward;
    returns ``token_level_costs`` (the cost on the last response token) and ``cost/*`` metrics."""
    SECTION, OUTPUT = "cost", "token_level_costs"
