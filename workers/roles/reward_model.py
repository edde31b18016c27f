"""Reward-model trainer: a value model (causal-LM body + scalar ``score`` head) fitted to preference pairs.

The score of a sequence is the head's output at its last real token::

    r(x, y) = head(h_last(prompt + response + eos))

which is what :class:`~hybridflow.workers.roles.reward.RewardWorker` reads from the exported
checkpoint (``reward.model_path``), so a model trained here plugs into any RL recipe unchanged.

``train_step(pairs)``: one optimizer step on ``rm.loss(r(chosen), r(rejected), margin=rm.margin)``
(default ``bradley_terry``: ``mean −log σ(r_c − r_r − m)``); ``compute_scores(pairs)``:
``chosen_scores``, ``rejected_scores`` ``[B]`` (no grad). ``pairs`` are rows of
:func:`~hybridflow.trainer.data.collate_pairs`. The two sides of a pair run as two consecutive
rows of one micro-batch, so ``optim.micro_batch_size`` counts pairs (2 sequences each) and token
packing (``max_tokens_per_micro_batch``) is refused: it would separate them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tensordict import TensorDict

import dataclasses

from hybridflow import DataProto, Dispatch, Role, Worker, register
from hybridflow.trainer.algos import get_preference_loss
from hybridflow.trainer.settings import RewardModelSettings, RMObjective, TrainSettings
from hybridflow.workers.roles.common import EngineStateMixin, build_engine

SIDES = ("chosen", "rejected")


def last_token_scores(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``values[i, t_i]`` with ``t_i`` the last position where ``attention_mask[i]`` is 1 (any
    padding side; position 0 for a row without a real token). ``[B, L] → [B]``."""
    last = attention_mask.long().cumsum(-1).argmax(-1)  # the first position of the maximal count
    return values[torch.arange(values.shape[0], device=values.device), last]


def interleave_pairs(batch: TensorDict, pad_token_id: int = 0) -> TensorDict:
    """Pair rows → sequence rows ``2i`` (chosen ``i``) and ``2i + 1`` (rejected ``i``), right-padded
    to one width; ``pair`` and ``is_chosen`` columns say which is which."""
    width = max(batch[f"{side}_input_ids"].shape[1] for side in SIDES)
    n = batch.batch_size[0]
    cols = {}
    for key, pad in (("input_ids", pad_token_id), ("attention_mask", 0), ("position_ids", 0)):
        sides = [F.pad(batch[f"{s}_{key}"], (0, width - batch[f"{s}_{key}"].shape[1]), value=pad) for s in SIDES]
        cols[key] = torch.stack(sides, dim=1).flatten(0, 1)
    cols["pair"] = torch.arange(n).repeat_interleave(2)
    cols["is_chosen"] = torch.tensor([1, 0]).repeat(n)
    return TensorDict(cols, batch_size=[2 * n])


class RewardModelWorker(EngineStateMixin, Worker):
    """``optim``: the engine (``micro_batch_size`` counts pairs); ``rm``: the preference loss."""

    def __init__(self, optim: TrainSettings, rm: RMObjective, *, model_path: str, total_steps: int, seed: int):
        super().__init__()
        self.init_distributed()
        options = optim.engine_options
        if optim.max_tokens_per_micro_batch or options.get("forward_max_tokens_per_micro_batch"):
            raise ValueError("optim.max_tokens_per_micro_batch: reward-model training keeps the two sides of a pair "
                             "in one micro-batch, which token packing cannot; set optim.micro_batch_size (pairs)")
        pairs_to_rows = {"forward_micro_batch_size": 2 * int(options["forward_micro_batch_size"])} \
            if options.get("forward_micro_batch_size") else {}
        optim = dataclasses.replace(optim, engine_options={**options, **pairs_to_rows},
                                    micro_batch_size=2 * optim.micro_batch_size if optim.micro_batch_size else None)
        self.rm_cfg = rm
        self.loss = get_preference_loss(rm.loss)
        self.engine = build_engine(model_path, optim, model_type="value", total_steps=total_steps, seed=seed)
        tokenizer = self.engine.tokenizer
        self.pad_token_id = int(tokenizer.pad_token_id or 0) if tokenizer is not None else 0

    @classmethod
    def role(cls, s: RewardModelSettings) -> Role:
        return Role(cls, s.optim, s.rm, model_path=s.model.path, total_steps=s.trainer.steps, seed=s.seed)

    @register(dispatch=Dispatch.DP_COMPUTE_PROTO)
    def train_step(self, data: DataProto) -> DataProto:
        margin = self.rm_cfg.margin

        def loss_fn(mb, out):
            scores = last_token_scores(out["values"], mb["attention_mask"])
            chosen = mb["is_chosen"].bool()
            if 2 * int(chosen.sum()) != len(chosen) or not torch.equal(mb["pair"][chosen], mb["pair"][~chosen]):
                raise RuntimeError("RewardModelWorker: a micro-batch holds only one side of a pair; micro-batches "
                                   "must be consecutive row chunks of even size (optim.micro_batch_size counts pairs)")
            loss, metrics = self.loss(scores[chosen], scores[~chosen], margin=margin)
            return loss, {k: float(v) for k, v in metrics.items()}

        metrics = self.engine.train_batch(interleave_pairs(data.batch, self.pad_token_id), loss_fn,
                                          loss_weighting="rows")
        return DataProto(meta_info={"metrics": {k if "/" in k else f"rm/{k}": v for k, v in metrics.items()}})

    @register(dispatch=Dispatch.DP_COMPUTE_PROTO)
    def compute_scores(self, data: DataProto) -> DataProto:
        seqs = interleave_pairs(data.batch, self.pad_token_id)
        values = self.engine.forward(seqs.select("input_ids", "attention_mask", "position_ids"))["values"]
        scores = last_token_scores(values, seqs["attention_mask"])
        return DataProto.from_dict({"chosen_scores": scores[0::2], "rejected_scores": scores[1::2]})
