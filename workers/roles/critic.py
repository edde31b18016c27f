"""The critic: a value model (causal-LM body + scalar head) trained with the clipped value loss.

``compute_values`` → ``values`` ``[B, R]`` (value of the state before each response token);
``update`` runs ``ppo_epochs`` × mini-batches of
``0.5 · max((V − R)², (V_old + clip(V − V_old, ±cliprange_value) − R)²)``.
"""
from __future__ import annotations

from hybridflow import DataProto, Dispatch, Worker, register
from hybridflow.trainer.algos import value_loss
from hybridflow.workers.roles.common import EngineStateMixin, build_engine, optimizer_steps, run_updates, section


class CriticWorker(EngineStateMixin, Worker):
    def __init__(self, config):
        super().__init__()
        self.init_distributed()
        self.cfg = section(config, "critic")
        self.engine = build_engine(self.cfg.get("model_path") or config.model.path, self.cfg, model_type="value",
                                   total_steps=optimizer_steps(config, self.cfg), seed=int(config.get("seed", 0)))
        self.set_dispatch_info("critic", dp_rank=self.rank, dp_size=self.world_size, collect=True)

    @register(dispatch=Dispatch.MESH_PROTO, mesh="critic")
    def compute_values(self, data: DataProto) -> DataProto:
        out = self.engine.forward(data.batch.select("input_ids", "attention_mask", "position_ids", "responses"))
        return DataProto.from_dict({"values": out["values"] * data.batch["response_mask"]})

    @register(dispatch=Dispatch.MESH_PROTO, mesh="critic")
    def update(self, data: DataProto) -> DataProto:
        mode = self.cfg.get("loss_agg_mode", "token-mean")
        clip = float(self.cfg.get("cliprange_value", 0.5))

        def loss_fn(mb, out):
            loss, metrics = value_loss(out["values"], mb["values"], mb["returns"], mb["response_mask"], clip, mode)
            return loss, {"critic/vf_loss": loss.item(), **{k: float(v) for k, v in metrics.items()}}

        keys = ["input_ids", "attention_mask", "position_ids", "responses", "response_mask", "values", "returns"]
        return run_updates(self.engine, data, keys, loss_fn, self.cfg, dp_size=self.world_size, prefix="critic")
