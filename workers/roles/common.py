"""What the role workers share: building an engine from a config section, mini-batch loops."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDict

from hybridflow import DataProto, Dispatch, register
from hybridflow.trainer.metrics import reduce_metrics

BACKENDS = ("fsdp", "megatron")  # `actor.backend` / `critic.backend` (the reference follows the actor)


def section(cfg: Any, name: str) -> dict:
    """A config section as a plain dict ({} when absent)."""
    node = cfg.get(name) if isinstance(cfg, (dict, DictConfig)) else None
    if node is None:
        return {}
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def optimizer_steps(config, role_cfg: dict) -> int:
    """Optimizer steps of a run (what LR schedules span): ``trainer.steps`` × ``ppo_epochs`` ×
    mini-batches per step (``data.batch_size · rollout.n / ppo_mini_batch_size``, rounded up)."""
    rows = int(config.data.batch_size) * int(config.rollout.get("n", 1))
    per_step = -(-rows // int(role_cfg.get("ppo_mini_batch_size", rows)))
    return int(config.trainer.steps) * int(role_cfg.get("ppo_epochs", 1)) * per_step


def build_engine(model_path: str, role_cfg: dict, *, model_type: str = "causal_lm", trainable: bool = True,
                 total_steps: int | None = None, seed: int = 0):
    """The training engine named by ``role_cfg['backend']`` (default fsdp). Engine keys are taken
    from the role's section (``actor.lr``, ``actor.micro_batch_size``, ...); the rest of the
    section belongs to the role. A frozen model (reference, reward model) gets lr 0.
    ``backend: megatron`` also reads the layout keys of the role's ``megatron`` sub-section
    (``tp``, ``pp``, ``use_distributed_optimizer``, ``overlap_grad_reduce``)."""
    backend = role_cfg.get("backend", "fsdp")
    if backend not in BACKENDS:
        raise ValueError(f"unknown training backend {backend!r}; available: {BACKENDS}")
    if backend == "megatron":
        from hybridflow.workers.engines.megatron import MegatronEngine as Engine
        from hybridflow.workers.engines.megatron import MegatronEngineConfig as EngineCls
    else:
        from hybridflow.workers.engines.fsdp import FSDPEngine as Engine
        from hybridflow.workers.engines.fsdp import FSDPEngineConfig as EngineCls
    fields = {f.name for f in dataclasses.fields(EngineCls)}
    values = {k: v for k, v in role_cfg.items() if k in fields}
    if backend == "megatron":
        values.update({k: v for k, v in (role_cfg.get("megatron") or {}).items() if v is not None})
    values.update(model_path=model_path, model_type=model_type, seed=seed)
    if total_steps:
        values.setdefault("total_steps", total_steps)
    if not trainable:
        values.update(lr=0.0, lr_schedule="constant", warmup_steps=0, warmup_ratio=0.0)
    return Engine(values)


def dispatch_position(engine, rank: int, world_size: int) -> tuple[int, int, bool]:
    """``(dp_rank, dp_size, collect)`` of this rank for ``Worker.set_dispatch_info``: the engine's
    own (megatron: one chunk per DP group, answered by TP rank 0 of the last stage) or, for
    engines that do not declare one (FSDP: every rank is a DP rank), ``(rank, world_size, True)``."""
    return getattr(engine, "dispatch_info", None) or (rank, world_size, True)


def generation_weights(engine):
    """Context manager around a rollout on ``engine.module``: engines that keep no HF module
    (megatron) load the gathered weights into it for the body; others need nothing."""
    context = getattr(engine, "generation_context", None)
    return context() if context is not None else contextlib.nullcontext()


def mini_batches(batch: TensorDict, mini_batch_size: int, epochs: int, dp_size: int, seed: int,
                 shuffle: bool) -> Iterator[TensorDict]:
    """``epochs`` passes over the local batch in mini-batches of ``mini_batch_size / dp_size`` rows
    (the configured size is global, over all data-parallel ranks)."""
    n = batch.batch_size[0]
    local = max(1, min(n, mini_batch_size // dp_size))
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        for start in range(0, n, local):
            yield batch[torch.as_tensor(order[start:start + local])]


def run_updates(engine, data: DataProto, keys: list[str], loss_fn: Callable, cfg: dict, *, dp_size: int,
                prefix: str, temperature: float = 1.0, with_entropy: bool = False) -> DataProto:
    """The PPO-style update loop shared by actor and critic: epochs × mini-batches, one optimizer
    step each; returns the metrics (means over steps) in ``meta_info['metrics']``, the engine's
    ``grad_norm``/``lr`` under ``<prefix>/``. Micro-batch
    losses are weighted by tokens for ``token-mean`` aggregation and by rows for ``seq-mean-*``."""
    loss_weighting = "tokens" if cfg.get("loss_agg_mode", "token-mean") == "token-mean" else "rows"
    batch = data.batch.select(*[k for k in keys if k in data.batch.keys()])
    collected: dict[str, list] = {}
    seed = int(data.meta_info.get("step", 0))
    for mb in mini_batches(batch, int(cfg.get("ppo_mini_batch_size", len(data))), int(cfg.get("ppo_epochs", 1)),
                           dp_size, seed, bool(cfg.get("shuffle", False))):
        metrics = engine.train_batch(mb, loss_fn, temperature=temperature, with_entropy=with_entropy,
                                     loss_weighting=loss_weighting)
        for key, value in metrics.items():
            collected.setdefault(key if "/" in key else f"{prefix}/{key}", []).append(float(value))
    return DataProto(meta_info={"metrics": reduce_metrics(collected)})


class EngineStateMixin:
    """Checkpoint methods of a role that owns a trainable ``self.engine`` (actor, critic)."""

    @register(dispatch=Dispatch.ONE_TO_ALL)
    def save_checkpoint(self, path: str) -> None:
        self.engine.save_checkpoint(path)

    @register(dispatch=Dispatch.ONE_TO_ALL)
    def load_checkpoint(self, path: str) -> None:
        self.engine.load_checkpoint(path)

    @register(dispatch=Dispatch.ONE_TO_ALL)
    def export_hf(self, path: str) -> None:
        """Write the model as a plain transformers checkpoint (safetensors) to ``path``."""
        self.engine.export_hf(path)
