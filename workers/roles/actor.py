"""The hybrid actor: training engine and rollout on the same module, in one process per rank.

Methods (all ``MESH_PROTO`` on the mesh ``"actor"``: each rank gets its data-parallel chunk):

- ``generate(prompts)``: ``n`` samples per prompt (``rollout.n``); sampling options from the
  ``rollout`` section, overridable per call through ``prompts.meta_info`` (``n``,
  ``temperature``, ``do_sample``, ``max_new_tokens``, ``top_p``, ``top_k``, ``seed``,
  ``ignore_eos``).
- ``compute_log_prob(batch)``: ``old_log_probs`` (and ``entropy``) at the rollout temperature.
- ``update(batch)``: ``ppo_epochs`` × mini-batches of the chosen policy loss
  (``actor.policy_loss``), minus ``entropy_coeff`` × entropy, plus ``kl_loss_coef`` × KL to the
  reference when ``use_kl_loss``.
"""
from __future__ import annotations

from hybridflow import DataProto, Dispatch, Worker, register
from hybridflow.trainer.algos import agg_loss, get_policy_loss, kl_penalty
from hybridflow.workers.rollout import build_rollout
from hybridflow.workers.roles.common import EngineStateMixin, build_engine, optimizer_steps, run_updates, section

SAMPLING_KEYS = ("n", "temperature", "top_p", "top_k", "do_sample", "max_new_tokens", "seed", "ignore_eos")


class ActorWorker(EngineStateMixin, Worker):
    """Actor + rollout (the hybrid engine) for one rank. ``config`` is the whole run config."""

    def __init__(self, config):
        super().__init__()
        self.init_distributed()
        self.cfg = section(config, "actor")
        self.rollout_cfg = section(config, "rollout")
        self.engine = build_engine(config.model.path, self.cfg, total_steps=optimizer_steps(config, self.cfg),
                                   seed=int(config.get("seed", 0)))
        self.rollout = build_rollout(self.rollout_cfg.get("backend", "hf"), self.engine, self.rollout_cfg, config)
        self.set_dispatch_info("actor", dp_rank=self.rank, dp_size=self.world_size, collect=True)
        self.policy_loss = get_policy_loss(self.cfg.get("policy_loss", "ppo"))

    @register(dispatch=Dispatch.MESH_PROTO, mesh="actor")
    def generate(self, prompts: DataProto) -> DataProto:
        opts = {k: self.rollout_cfg[k] for k in SAMPLING_KEYS if k in self.rollout_cfg}
        opts.update({k: prompts.meta_info[k] for k in SAMPLING_KEYS if k in prompts.meta_info})
        n = int(opts.pop("n", 1))
        if opts.get("seed") is not None:  # a different stream on every rank, reproducible per step
            opts["seed"] = int(opts["seed"]) * 1000 + self.rank
        out = self.rollout.generate(prompts.batch.select("input_ids", "attention_mask", "position_ids"), n=n,
                                    eos_token_id=self.engine.tokenizer.eos_token_id,
                                    pad_token_id=self.engine.tokenizer.pad_token_id, **opts)
        non_tensor = {k: v.repeat(n, axis=0) for k, v in prompts.non_tensor_batch.items()}
        meta = {**prompts.meta_info,
                "temperature": float(opts.get("temperature", 1.0)) if opts.get("do_sample", True) else 1.0}
        return DataProto(out, non_tensor, meta)

    @register(dispatch=Dispatch.MESH_PROTO, mesh="actor")
    def compute_log_prob(self, data: DataProto) -> DataProto:
        out = self.engine.forward(data.batch.select("input_ids", "attention_mask", "position_ids", "responses"),
                                  temperature=self._temperature(data), with_entropy=True)
        return DataProto.from_dict({"old_log_probs": out["log_probs"], "entropy": out["entropy"]})

    def _temperature(self, data: DataProto) -> float:
        return float(data.meta_info.get("temperature", self.rollout_cfg.get("temperature", 1.0)))

    @register(dispatch=Dispatch.MESH_PROTO, mesh="actor")
    def update(self, data: DataProto) -> DataProto:
        cfg = self.cfg
        mode = cfg.get("loss_agg_mode", "token-mean")
        entropy_coeff = float(cfg.get("entropy_coeff", 0.0))
        use_kl = bool(cfg.get("use_kl_loss", False))
        loss_options = {k: v for k, v in cfg.items() if k not in ("rollout_is_weights", "norm_constant")}

        def loss_fn(mb, out):
            mask = mb["response_mask"]
            # seq-mean-token-sum-norm: mean over rows of (token sum / R), so micro-batches weigh by rows
            norm = mask.shape[0] * mask.shape[1] if mode == "seq-mean-token-sum-norm" else None
            extra = {"rollout_is_weights": mb["rollout_is_weights"]} if "rollout_is_weights" in mb.keys() else {}
            loss, metrics = self.policy_loss(mb["old_log_probs"], out["log_probs"], mb["advantages"], mask,
                                             **loss_options, norm_constant=norm, **extra)
            metrics = {k: float(v) for k, v in metrics.items()}
            metrics["actor/pg_loss"] = loss.item()
            entropy = agg_loss(out["entropy"], mask, mode, norm)
            metrics["actor/entropy"] = entropy.item()
            loss = loss - entropy_coeff * entropy
            if use_kl:
                kl = agg_loss(kl_penalty(out["log_probs"], mb["ref_log_probs"], cfg.get("kl_loss_type", "k3")),
                              mask, mode, norm)
                metrics["actor/kl_loss"] = kl.item()
                loss = loss + float(cfg.get("kl_loss_coef", 0.001)) * kl
            return loss, metrics

        keys = ["input_ids", "attention_mask", "position_ids", "responses", "response_mask", "old_log_probs",
                "advantages", "ref_log_probs", "rollout_is_weights"]
        out = run_updates(self.engine, data, keys, loss_fn, cfg, dp_size=self.world_size, prefix="actor",
                          temperature=self._temperature(data), with_entropy=True)
        return out
