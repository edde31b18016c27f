"""What the role workers share: building an engine from a role's settings, mini-batch loops."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
from tensordict import TensorDict

from hybridflow import DataProto, Dispatch, register
from hybridflow.trainer.metrics import reduce_metrics
from hybridflow.trainer.settings import ActorSettings, CriticSettings, RewardSettings, TrainSettings

BACKENDS = {"fsdp": ("hybridflow.workers.engines.fsdp", "FSDPEngine", "FSDPEngineConfig"),
            "megatron": ("hybridflow.workers.engines.megatron", "MegatronEngine", "MegatronEngineConfig")}
_OWN_FIELDS = ("backend", "megatron", "engine_options", "lora")  # TrainSettings fields that are no engine key


def _engine_classes(backend: str) -> tuple[type, type]:
    if backend not in BACKENDS:
        raise ValueError(f"unknown training backend {backend!r}; available: {tuple(BACKENDS)}")
    module, engine, config = BACKENDS[backend]
    loaded = importlib.import_module(module)
    return getattr(loaded, engine), getattr(loaded, config)


def engine_values(settings: TrainSettings | RewardSettings | Mapping) -> tuple[str, dict]:
    """``(backend, engine config keys)`` of a role's settings: the typed engine fields of a
    :class:`TrainSettings` (with its megatron layout) plus its ``engine_options``; a frozen model
    with no engine section (a reward model) has only the options. A plain mapping (a role section
    as a dict: ``{"backend": "megatron", "megatron": {"tp": 2}, "lr": 1e-5, ...}``) gives its
    engine keys, its layout merged in; its other keys belong to the role and are left out."""
    if isinstance(settings, Mapping):
        backend = settings.get("backend", "fsdp")
        _, config_cls = _engine_classes(backend)
        fields = {f.name for f in dataclasses.fields(config_cls)}
        values = {k: v for k, v in settings.items() if k in fields}
        if backend == "megatron":
            values.update({k: v for k, v in (settings.get("megatron") or {}).items() if v is not None})
        return backend, values
    values: dict = {}
    backend = "fsdp"
    if isinstance(settings, TrainSettings):
        backend = settings.backend
        values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(TrainSettings)
                  if f.name not in _OWN_FIELDS}
        if settings.uses_lora:
            values.update(lora_rank=settings.lora.rank, lora_alpha=settings.lora.alpha,
                          lora_dropout=settings.lora.dropout, lora_target_modules=settings.lora.target_modules)
        layout = settings.megatron
        if backend == "megatron" and layout is not None:
            values.update(tp=layout.tp, pp=layout.pp, use_distributed_optimizer=layout.use_distributed_optimizer,
                          **({"reshard": layout.reshard} if layout.reshard else {}), **layout.options)
    values.update(settings.engine_options)
    return backend, values


def check_engine_options(settings: TrainSettings | RewardSettings, key: str) -> None:
    """The ``+key`` engine options of a section name keys of its backend's engine config (a
    ConfigError with the nearest keys, on the controller, before any worker starts)."""
    from hybridflow.config import ConfigError, unknown_key_message

    backend, _ = engine_values(settings)
    _, config_cls = _engine_classes(backend)
    known = [f.name for f in dataclasses.fields(config_cls)]
    extra = dict(settings.engine_options)
    if backend == "megatron" and settings.megatron is not None:  # the section is read by megatron only
        extra.update({f"megatron.{k}": v for k, v in settings.megatron.options.items()})
    for name in extra:
        if name.removeprefix("megatron.") not in known or name in ("model_path", "model_type", "seed", "total_steps"):
            msg = unknown_key_message(f"{key}.{name}", [f"{key}.{k}" for k in known], "command line")
            raise ConfigError(msg.replace("Prefix the key with '+' to add a new one.",
                                          f"Keys of the {backend} engine: {', '.join(known)}."))


def build_engine(model_path: str, settings: TrainSettings | RewardSettings | Mapping, *,
                 model_type: str = "causal_lm", trainable: bool = True, total_steps: int | None = None, seed: int = 0):
    """The training engine of a role (:func:`engine_values`: backend and keys) on ``model_path``.
    A frozen model (reference, reward model) gets lr 0; ``total_steps`` spans the LR schedule."""
    backend, values = engine_values(settings)
    engine_cls, _ = _engine_classes(backend)
    values.update(model_path=model_path, model_type=model_type, seed=seed)
    if total_steps:
        values.setdefault("total_steps", total_steps)
    if not trainable:
        values.update(lr=0.0, lr_schedule="constant", warmup_steps=0, warmup_ratio=0.0)
    return engine_cls(values)


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


def run_updates(engine, data: DataProto, keys: list[str], loss_fn: Callable, role: ActorSettings | CriticSettings,
                *, dp_size: int, prefix: str, temperature: float = 1.0, with_entropy: bool = False) -> DataProto:
    """The PPO-style update loop shared by actor and critic: ``role.ppo_epochs`` × mini-batches of
    ``role.ppo_mini_batch_size`` rows, one optimizer step each; returns the metrics (means over
    steps) in ``meta_info['metrics']``, the engine's ``grad_norm``/``lr`` under ``<prefix>/``.
    Micro-batch losses are weighted by tokens for ``token-mean`` aggregation and by rows for
    ``seq-mean-*``."""
    loss_weighting = "tokens" if role.loss_agg_mode == "token-mean" else "rows"
    batch = data.batch.select(*[k for k in keys if k in data.batch.keys()])
    collected: dict[str, list] = {}
    seed = int(data.meta_info.get("step", 0))
    for mb in mini_batches(batch, role.ppo_mini_batch_size, role.ppo_epochs, dp_size, seed, role.shuffle):
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
