"""Supervised fine-tuning worker: next-token cross-entropy on the response tokens.

``train_step(batch)`` takes SFT rows (``input_ids``, ``attention_mask``, ``position_ids``,
``loss_mask`` aligned with ``input_ids``, 1 on response tokens) and makes one optimizer step on
``loss = −Σ loss_mask·log p(x_{t+1} | x_≤t) / Σ loss_mask`` (token mean over the global batch)."""
from __future__ import annotations

from hybridflow import DataProto, Dispatch, Role, Worker, register
from hybridflow.trainer.settings import SFTSettings, TrainSettings
from hybridflow.workers.roles.common import EngineStateMixin, build_engine


class SFTWorker(EngineStateMixin, Worker):
    def __init__(self, optim: TrainSettings, *, model_path: str, total_steps: int, seed: int):
        super().__init__()
        self.init_distributed()
        self.engine = build_engine(model_path, optim, total_steps=total_steps, seed=seed)

    @classmethod
    def role(cls, s: SFTSettings) -> Role:
        return Role(cls, s.optim, model_path=s.model.path, total_steps=s.trainer.steps, seed=s.seed)

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
