"""The hybrid actor: training engine and rollout on the same module, in one process per rank.

Methods (all ``MESH_PROTO`` on the mesh ``"actor"``: each rank gets its data-parallel chunk):

- ``generate(prompts)``: ``n`` samples per prompt (``rollout.n``); sampling options from the
  ``rollout`` section, overridable per call through ``prompts.meta_info`` (``n``,
  ``temperature``, ``do_sample``, ``max_new_tokens``, ``top_p``, ``top_k``, ``seed``,
  ``ignore_eos``).
- ``compute_log_prob(batch)``: ``old_log_probs`` (and ``entropy``) at the rollout temperature. When
  the batch has ``rollout_log_probs``, the rollout-vs-trainer mismatch metrics
  (``rollout_corr/*``, workers/rollout/mismatch.py) are reported with the next ``update``, and with
  ``actor.rollout_is`` the truncated IS weights ``rollout_is_weights = min(pi_old / pi_rollout,
  actor.rollout_is_cap)`` that ``update`` passes to the policy loss.
- ``update(batch)``: ``ppo_epochs`` × mini-batches of the chosen policy loss
  (``actor.policy_loss``), minus ``entropy_coeff`` × entropy, plus ``kl_loss_coef`` × KL to the
  reference when ``use_kl_loss``. π_old is the batch's ``old_log_probs``, or, without them
  (``actor.old_log_prob`` = ``update`` / ``rollout``), this forward's log-probs detached or the
  rollout's; the update then reports the ``rollout_corr/*`` metrics and ``actor/kl_ref`` itself. Afterwards the rollout backend takes the new weights
  (``rollout.sync_weights``; a no-op for hf); its metrics (``rollout/*``) come with the update's.

A rollout backend with its own weight copy (vLLM) is synced before the first generation too (and
after ``load_checkpoint``), sleeps after each generation and wakes before the next (GPU).
"""
from __future__ import annotations

import contextlib

import torch

from hybridflow import DataProto, Dispatch, Role, Worker, register
from hybridflow.trainer.algos import accepted_options, agg_loss, get_policy_loss, kl_penalty, masked_mean
from hybridflow.trainer.settings import ActorSettings, RLSettings, RolloutSettings
from hybridflow.workers.rollout import build_rollout
from hybridflow.workers.rollout.mismatch import rollout_mismatch_metrics, truncated_is_weights
from hybridflow.workers.roles.common import (EngineStateMixin, build_engine, dispatch_position, generation_weights,
                                             run_updates)

SAMPLING_KEYS = ("n", "temperature", "top_p", "top_k", "do_sample", "max_new_tokens", "seed", "ignore_eos")


class ActorWorker(EngineStateMixin, Worker):
    """Actor + rollout (the hybrid engine) for one rank: the ``actor`` and ``rollout`` settings,
    the policy's checkpoint, the run's optimizer-step count (LR schedule) and seed."""

    def __init__(self, actor: ActorSettings, rollout: RolloutSettings, *, model_path: str, total_steps: int,
                 seed: int):
        super().__init__()
        self.init_distributed()
        self.cfg, self.rollout_cfg = actor, rollout
        self.engine = build_engine(model_path, actor, total_steps=total_steps, seed=seed)
        self.rollout = build_rollout(rollout.backend, self.engine, rollout, seed=seed)
        self.dp_rank, self.dp_size, collect = dispatch_position(self.engine, self.rank, self.world_size)
        self.set_dispatch_info("actor", dp_rank=self.dp_rank, dp_size=self.dp_size, collect=collect)
        self.policy_loss = get_policy_loss(actor.policy_loss)
        self.loss_options = accepted_options(self.policy_loss, actor.loss_options())
        self._rollout_stale = True      # the rollout engine may not hold the actor's weights yet
        self._rollout_metrics: dict = {}  # rollout/* and rollout_corr/* metrics, reported with the next update

    @classmethod
    def role(cls, s: RLSettings) -> Role:
        """What the actor gets of the run's settings (picked on the controller)."""
        return Role(cls, s.actor, s.rollout, model_path=s.model.path, total_steps=s.optimizer_steps(s.actor),
                    seed=s.seed)

    def _sync_rollout(self) -> None:
        self._rollout_metrics.update(self.rollout.sync_weights(self.engine))
        self._rollout_stale = False

    @register(dispatch=Dispatch.ONE_TO_ALL)
    def load_checkpoint(self, path: str) -> None:
        super().load_checkpoint(path)
        self._rollout_stale = True

    @register(dispatch=Dispatch.MESH_PROTO, mesh="actor")
    def generate(self, prompts: DataProto) -> DataProto:
        opts = self.rollout_cfg.sampling()
        opts.update({k: prompts.meta_info[k] for k in SAMPLING_KEYS if k in prompts.meta_info})
        n = int(opts.pop("n", 1))
        if opts.get("seed") is not None:  # a different stream on every DP rank, reproducible per step
            opts["seed"] = int(opts["seed"]) * 1000 + self.dp_rank
        if self._rollout_stale:
            self._sync_rollout()
        self._rollout_metrics.update(self.rollout.wake_up())
        weights = generation_weights(self.engine) if self.rollout.uses_engine_module else contextlib.nullcontext()
        with weights:  # megatron + hf: the resharded HF weights in the module, released after
            out = self.rollout.generate(prompts.batch.select("input_ids", "attention_mask", "position_ids"), n=n,
                                        eos_token_id=self.engine.tokenizer.eos_token_id,
                                        pad_token_id=self.engine.tokenizer.pad_token_id, **opts)
        self._rollout_metrics.update(self.rollout.sleep())
        non_tensor = {k: v.repeat(n, axis=0) for k, v in prompts.non_tensor_batch.items()}
        meta = {**prompts.meta_info,
                "temperature": float(opts.get("temperature", 1.0)) if opts.get("do_sample", True) else 1.0}
        return DataProto(out, non_tensor, meta)

    @register(dispatch=Dispatch.MESH_PROTO, mesh="actor")
    def compute_log_prob(self, data: DataProto) -> DataProto:
        out = self.engine.forward(data.batch.select("input_ids", "attention_mask", "position_ids", "responses"),
                                  temperature=self._temperature(data), with_entropy=True)
        result = DataProto.from_dict({"old_log_probs": out["log_probs"], "entropy": out["entropy"]})
        has_rollout = "rollout_log_probs" in data.batch.keys() and "response_mask" in data.batch.keys()
        if self.cfg.rollout_is and not has_rollout:
            raise ValueError("actor.rollout_is=true needs the rollout's 'rollout_log_probs' and 'response_mask' "
                             f"in the batch given to compute_log_prob; it has {list(data.batch.keys())}")
        if has_rollout:  # metrics go out with the next update (meta_info['metrics'] of the batch is the reward's)
            rollout_lp, mask = data.batch["rollout_log_probs"], data.batch["response_mask"]
            self._rollout_metrics.update(rollout_mismatch_metrics(rollout_lp, out["log_probs"], mask))
            if self.cfg.rollout_is:
                weights, is_metrics = truncated_is_weights(rollout_lp, out["log_probs"], mask, self.cfg.rollout_is_cap)
                result.batch["rollout_is_weights"] = weights
                self._rollout_metrics.update(is_metrics)
        return result

    @register(dispatch=Dispatch.MESH_PROTO, mesh="actor")
    def compute_ref_log_prob(self, data: DataProto) -> DataProto:
        """``ref_log_probs`` of the base model: the actor's module with its LoRA adapters off (the
        reference for free, ``RLSettings.reference_from_actor``)."""
        if not getattr(self.engine, "lora", False):
            raise RuntimeError("ActorWorker.compute_ref_log_prob: the actor has no LoRA adapters to turn off; the "
                               "reference is a ReferenceWorker (build_workers(..., 'ref'))")
        with self.engine.adapters_off():
            out = self.engine.forward(data.batch.select("input_ids", "attention_mask", "position_ids", "responses"),
                                      temperature=self._temperature(data))
        return DataProto.from_dict({"ref_log_probs": out["log_probs"]})

    def _temperature(self, data: DataProto) -> float:
        return float(data.meta_info.get("temperature", self.rollout_cfg.temperature))

    def _old_log_probs(self, mb, out) -> tuple[torch.Tensor, dict]:
        """π_old of a micro-batch: the recomputed ``old_log_probs`` when the batch has them, else
        (``actor.old_log_prob`` = ``update`` or ``rollout``) this forward's log-probs detached or the
        rollout's; then also the metrics the ``old_log_prob`` stage would have reported."""
        if "old_log_probs" in mb.keys():
            return mb["old_log_probs"], {}
        source = self.cfg.old_log_prob
        if source == "recompute":
            raise KeyError("actor.update: the batch has no 'old_log_probs' and actor.old_log_prob is recompute; "
                           "call actor.compute_log_prob first (trainer/rl.py: add_old_log_probs)")
        current, mask = out["log_probs"].detach(), mb["response_mask"]
        metrics = {f"actor/old_log_prob_from_{source}": 1.0}
        if "rollout_log_probs" in mb.keys():
            metrics.update(rollout_mismatch_metrics(mb["rollout_log_probs"], current, mask))
        if "ref_log_probs" in mb.keys():  # what compute_data_metrics reports from old_log_probs otherwise
            metrics["actor/kl_ref"] = float(masked_mean(current - mb["ref_log_probs"], mask))
        return (current if source == "update" else mb["rollout_log_probs"]), metrics

    @register(dispatch=Dispatch.MESH_PROTO, mesh="actor")
    def update(self, data: DataProto) -> DataProto:
        cfg = self.cfg
        mode = cfg.loss_agg_mode

        def loss_fn(mb, out):
            mask = mb["response_mask"]
            # seq-mean-token-sum-norm: mean over rows of (token sum / R), so micro-batches weigh by rows
            norm = mask.shape[0] * mask.shape[1] if mode == "seq-mean-token-sum-norm" else None
            extra = {"rollout_is_weights": mb["rollout_is_weights"]} if "rollout_is_weights" in mb.keys() else {}
            old, old_metrics = self._old_log_probs(mb, out)
            loss, metrics = self.policy_loss(old, out["log_probs"], mb["advantages"], mask,
                                             **self.loss_options, norm_constant=norm, **extra)
            metrics = {**{k: float(v) for k, v in metrics.items()}, **old_metrics}
            metrics["actor/pg_loss"] = loss.item()
            entropy = agg_loss(out["entropy"], mask, mode, norm)
            metrics["actor/entropy"] = entropy.item()
            loss = loss - cfg.entropy_coeff * entropy
            if cfg.use_kl_loss:
                kl = agg_loss(kl_penalty(out["log_probs"], mb["ref_log_probs"], cfg.kl_loss_type), mask, mode, norm)
                metrics["actor/kl_loss"] = kl.item()
                loss = loss + cfg.kl_loss_coef * kl
            return loss, metrics

        keys = ["input_ids", "attention_mask", "position_ids", "responses", "response_mask", "old_log_probs",
                "rollout_log_probs", "advantages", "ref_log_probs", "rollout_is_weights"]
        out = run_updates(self.engine, data, keys, loss_fn, cfg, dp_size=self.dp_size, prefix="actor",
                          temperature=self._temperature(data), with_entropy=True)
        self._sync_rollout()  # the rollout engine takes the new weights (no-op for hf)
        out.meta_info["metrics"].update(self._rollout_metrics)
        self._rollout_metrics = {}
        return out
