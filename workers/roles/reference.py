"""The reference policy: a frozen copy of the initial actor that scores log-probs.

Colocate it with the actor (``WorkerGroup.colocate(pool, actor=..., ref=...)``) so both live in
one process per rank. ``compute_ref_log_prob`` returns ``ref_log_probs`` at the rollout
temperature (the same convention as the actor's ``old_log_probs``)."""
from __future__ import annotations

from hybridflow import DataProto, Dispatch, Role, Worker, register
from hybridflow.trainer.settings import RLSettings, TrainSettings
from hybridflow.workers.roles.common import build_engine, dispatch_position


class ReferenceWorker(Worker):
    """``engine``: the actor's engine settings (its layout; ``ref`` overrides on top), run with lr 0 on ``model_path``;
    ``temperature``: the rollout's, used when a batch does not carry its own."""

    def __init__(self, engine: TrainSettings, *, model_path: str, temperature: float):
        super().__init__()
        self.init_distributed()
        self.engine = build_engine(model_path, engine, trainable=False)
        self.temperature = temperature
        self.set_dispatch_info("ref", *dispatch_position(self.engine, self.rank, self.world_size))

    @classmethod
    def role(cls, s: RLSettings) -> Role:
        return Role(cls, s.reference_engine(), model_path=s.role_model(s.ref.model_path),
                    temperature=s.rollout.temperature)

    @register(dispatch=Dispatch.MESH_PROTO, mesh="ref")
    def compute_ref_log_prob(self, data: DataProto) -> DataProto:
        out = self.engine.forward(data.batch.select("input_ids", "attention_mask", "position_ids", "responses"),
                                  temperature=float(data.meta_info.get("temperature", self.temperature)))
        return DataProto.from_dict({"ref_log_probs": out["log_probs"]})
