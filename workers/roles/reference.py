"""The reference policy: a frozen copy of the initial actor that scores log-probs.

Colocate it with the actor (``WorkerGroup.colocate(pool, actor=..., ref=...)``) so both live in
one process per rank. ``compute_ref_log_prob`` returns ``ref_log_probs`` at the rollout
temperature (the same convention as the actor's ``old_log_probs``)."""
from __future__ import annotations

from hybridflow import DataProto, Dispatch, Worker, register
from hybridflow.workers.roles.common import build_engine, dispatch_position, section


class ReferenceWorker(Worker):
    def __init__(self, config):
        super().__init__()
        self.init_distributed()
        ref_cfg = {**section(config, "actor"), **section(config, "ref")}
        self.engine = build_engine(ref_cfg.get("model_path") or config.model.path, ref_cfg, trainable=False)
        self.temperature = float(section(config, "rollout").get("temperature", 1.0))
        self.set_dispatch_info("ref", *dispatch_position(self.engine, self.rank, self.world_size))

    @register(dispatch=Dispatch.MESH_PROTO, mesh="ref")
    def compute_ref_log_prob(self, data: DataProto) -> DataProto:
        out = self.engine.forward(data.batch.select("input_ids", "attention_mask", "position_ids", "responses"),
                                  temperature=float(data.meta_info.get("temperature", self.temperature)))
        return DataProto.from_dict({"ref_log_probs": out["log_probs"]})
