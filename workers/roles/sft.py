"""Supervised fine-tuning worker: next-token cross-entropy on the response tokens.

``train_step(batch)`` takes SFT rows (``input_ids``, ``attention_mask``, ``position_ids``,
``loss_mask`` aligned with ``input_ids``, 1 on response tokens) and makes one optimizer step on
``loss = −Σ loss_mask·log p(x_{t+1} | x_≤t) / Σ loss_mask`` (token mean over the global batch)."""
from __future__ import annotations

from hybridflow import DataProto, Dispatch, Worker, register
from hybridflow.workers.roles.common import EngineStateMixin, build_engine, section


class SFTWorker(EngineStateMixin, Worker):
    def __init__(self, config):
        super().__init__()
        self.init_distributed()
        self.engine = build_engine(config.model.path, section(config, "optim"), total_steps=config.trainer.steps,
                                   seed=int(config.get("seed", 0)))

    @register(dispatch=Dispatch.DP_COMPUTE_PROTO)
    def train_step(self, data: DataProto) -> DataProto:
        def loss_fn(mb, out):
            mask = mb["loss_mask"].float()
            loss = -(out["log_probs"] * mask).sum() / mask.sum().clamp(min=1)
            return loss, {"sft/loss": loss.item()}

        batch = data.batch.select("input_ids", "attention_mask", "position_ids")
        batch["loss_mask"] = data.batch["loss_mask"][:, 1:]  # the dataset aligns it with input_ids; targets are [1:]
        metrics = self.engine.train_batch(batch, loss_fn, loss_weighting="tokens")
        return DataProto(meta_info={"metrics": metrics})
