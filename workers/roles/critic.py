"""The critic: a value model (causal-LM body + scalar head) trained with the clipped value loss.

``compute_values`` → ``values`` ``[B, R]`` (value of the state before each response token);
``update`` runs ``ppo_epochs`` × mini-batches of
``0.5 · max((V − R)², (V_old + clip(V − V_old, ±cliprange_value) − R)²)``.
:class:`CostCriticWorker` is the same role for Safe RLHF's cost: section ``cost_critic``, keys
``cost_values`` / ``cost_returns``, metrics ``cost_critic/*``.
"""
from __future__ import annotations

from hybridflow import DataProto, Dispatch, Role, Worker, register
from hybridflow.trainer.algos import value_loss
from hybridflow.trainer.settings import CriticSettings, RLSettings
from hybridflow.workers.roles.common import EngineStateMixin, build_engine, dispatch_position, run_updates


class CriticWorker(EngineStateMixin, Worker):
    SECTION, VALUES, RETURNS = "critic", "values", "returns"  # config section, batch keys it reads/writes

    def __init__(self, critic: CriticSettings, *, model_path: str, total_steps: int, seed: int):
        super().__init__()
        self.init_distributed()
        self.cfg = critic
        self.engine = build_engine(model_path, critic, model_type="value", total_steps=total_steps, seed=seed)
        self.dp_rank, self.dp_size, collect = dispatch_position(self.engine, self.rank, self.world_size)
        self.set_dispatch_info("critic", dp_rank=self.dp_rank, dp_size=self.dp_size, collect=collect)

    @classmethod
    def role(cls, s: RLSettings) -> Role:
        """The critic's section (``cost_critic`` for Safe RLHF's cost critic) and its checkpoint."""
        critic = getattr(s, cls.SECTION)
        return Role(cls, critic, model_path=s.role_model(critic.model_path), total_steps=s.optimizer_steps(critic),
                    seed=s.seed)

    @register(dispatch=Dispatch.MESH_PROTO, mesh="critic")
    def compute_values(self, data: DataProto) -> DataProto:
        out = self.engine.forward(data.batch.select("input_ids", "attention_mask", "position_ids", "responses"))
        return DataProto.from_dict({self.VALUES: out["values"] * data.batch["response_mask"]})

    @register(dispatch=Dispatch.MESH_PROTO, mesh="critic")
    def update(self, data: DataProto) -> DataProto:
        mode, clip = self.cfg.loss_agg_mode, self.cfg.cliprange_value

        def loss_fn(mb, out):
            loss, metrics = value_loss(out["values"], mb[self.VALUES], mb[self.RETURNS], mb["response_mask"], clip,
                                       mode)
            metrics = {f"{self.SECTION}/{k.removeprefix('critic/')}": float(v) for k, v in metrics.items()}
            return loss, {f"{self.SECTION}/vf_loss": loss.item(), **metrics}

        keys = ["input_ids", "attention_mask", "position_ids", "responses", "response_mask", self.VALUES, self.RETURNS]
        return run_updates(self.engine, data, keys, loss_fn, self.cfg, dp_size=self.dp_size, prefix=self.SECTION)


class CostCriticWorker(CriticWorker):
    """Safe RLHF's cost critic ``V_c``: fits ``cost_returns`` from ``cost_values`` (section ``cost_critic``)."""
    SECTION, VALUES, RETURNS = "cost_critic", "cost_values", "cost_returns"
