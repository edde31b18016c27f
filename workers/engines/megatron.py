"""megatron-core training engine: a GPTModel (Qwen2/Llama-style) with TP × PP × DP.

Layout: megatron's ``parallel_state.initialize_model_parallel(tp, pp)`` on the default process
group that :func:`hybridflow.worker.init_distributed` creates (``dp = world / (tp·pp)``; megatron's
rank order, TP fastest). Every rank loads the HF checkpoint on CPU and keeps its own
(tp_rank, pp_rank) shard (:func:`hybridflow.workers.convert.hf_to_megatron`). The chunk is wrapped
in megatron's ``DistributedDataParallel`` (gradients in ``main_grad`` buffers, averaged over DP)
and trained with ``get_megatron_optimizer`` (Adam with decoupled weight decay, optionally the
distributed optimizer = ZeRO-1 over DP). Micro-batches go through ``get_forward_backward_func()``
(1F1B pipeline schedule when ``pp > 1``).

Log-probs and entropy come from the last stage's vocabulary-parallel logits with
:func:`~.megatron_ops.vocab_parallel_log_probs` (never a full-vocabulary tensor on one rank).

Dispatch position (:attr:`MegatronEngine.dispatch_info`): ranks of one DP group get the same
chunk; only TP rank 0 of the last pipeline stage answers. Outputs of other ranks are zeros (PP
stages other than the last) and must be ignored, as the mesh dispatch does.

Loss weighting follows :meth:`TrainEngine.train_batch`: micro-batch ``mb`` contributes
``loss · D · size(mb) / size(global batch)``; megatron's schedule divides each micro-batch loss
by the number of micro-batches and DDP averages over ``D``, both compensated here.

CPU: with no CUDA device every entry point runs inside :func:`~.megatron_cpu.cpu_patches` (gloo; fp32/bf16).
Generation (hf rollout) uses :meth:`generation_state_dict` — the naive full gather into HF
names, loaded into an HF module for the duration of the rollout (:meth:`generation_context`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tensordict import TensorDict

from hybridflow.worker import init_distributed

from .base import EngineConfig, LossFn, TrainEngine, micro_batch_sizes
from .megatron_cpu import on_cpu
from .megatron_ops import ValueHead, padded_causal_mask, vocab_parallel_log_probs
from .ops import lr_factor, partition_micro_batches

__all__ = ["MegatronEngine", "MegatronEngineConfig", "init_megatron_parallel"]

_PARALLEL_WORLD = None  # the default process group megatron's parallel state was built on


RESHARD_MODES = ("micro_dp", "naive")


@dataclasses.dataclass
class MegatronEngineConfig(EngineConfig):
    """:class:`EngineConfig` keys plus the layout: ``tp`` (tensor-parallel size, 1), ``pp``
    (pipeline stages, 1; must divide the layer count), ``use_distributed_optimizer`` (False;
    True shards the optimizer state over DP), ``overlap_grad_reduce`` (False). ``dp`` is
    ``world_size / (tp · pp)``. ``reshard`` (``micro_dp``): how :meth:`MegatronEngine.generation_context`
    gets the full weights (see there). ``gradient_checkpointing`` maps to megatron's full-layer
    recompute. ``remove_padding=True`` is refused: megatron-core packs sequences only with
    Transformer Engine's THD attention, which this engine does not use."""

    tp: int = 1
    pp: int = 1
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    reshard: str = "micro_dp"  # generation weights: micro_dp (3D-HybridEngine) | naive (full all-gather)

    def validate(self) -> None:
        super().validate()
        if int(self.tp) < 1 or int(self.pp) < 1:
            raise ValueError(f"megatron: tp and pp must be >= 1, got tp={self.tp} pp={self.pp}")
        if self.reshard not in RESHARD_MODES:
            raise ValueError(f"megatron: reshard must be one of {RESHARD_MODES}, got {self.reshard!r}")
        if self.lora_rank:
            raise ValueError("megatron: LoRA (lora.rank > 0) is not supported by the megatron engine; use the fsdp "
                             "backend for LoRA (docs/backends.md#lora)")
        if self.compile:
            raise ValueError("megatron: compile=true is not supported (megatron-core brings its own fused "
                             "kernels with Transformer Engine); set compile=false for this role")
        if self.remove_padding:
            raise ValueError("megatron: remove_padding=true is not supported (megatron-core packs sequences only "
                             "with Transformer Engine's THD attention); set remove_padding=false for this role")


@on_cpu
def init_megatron_parallel(tp: int, pp: int) -> Tuple[int, int]:
    """Initialise (or reuse) megatron's parallel state with ``tp × pp`` on the default process group;
    returns ``(rank, world_size)``. Raises if it already exists with another layout (colocated
    megatron roles in one process must share tp/pp)."""
    from megatron.core import parallel_state as ps

    rank, world = init_distributed(timeout_s=1800)
    if world % (tp * pp):
        raise ValueError(f"megatron: world size {world} is not divisible by tp*pp = {tp}*{pp} "
                         "(actor.megatron.tp / actor.megatron.pp)")
    global _PARALLEL_WORLD
    if ps.model_parallel_is_initialized() and _PARALLEL_WORLD is not dist.group.WORLD:
        ps.destroy_model_parallel()  # built on a process group that has been destroyed since
    if ps.model_parallel_is_initialized():
        have = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
        if have != (tp, pp):
            raise ValueError(f"megatron: this process already uses tp={have[0]} pp={have[1]}; a colocated "
                             f"megatron engine asked for tp={tp} pp={pp} (all megatron roles must match)")
    else:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        _PARALLEL_WORLD = dist.group.WORLD
    return rank, world


def _load_tokenizer(path: str):
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class MegatronEngine(TrainEngine):
    """megatron-core engine. ``MegatronEngine(config, **overrides)``; keys: see
    :class:`MegatronEngineConfig`. A model with ``lr == 0`` (reference, reward model) gets no
    DDP wrapper or optimizer (``train_batch`` then raises)."""

    @on_cpu
    def __init__(self, config=None, **overrides):
        from megatron.core import parallel_state as ps
        from transformers import AutoConfig

        cfg = MegatronEngineConfig.from_any(config, **overrides)
        self.config = cfg
        if not os.path.isfile(os.path.join(cfg.model_path, "config.json")):
            raise FileNotFoundError(f"MegatronEngine: model_path {cfg.model_path!r} is not a Hugging Face "
                                    "checkpoint directory (no config.json there)")
        self._rank, self._world = init_megatron_parallel(int(cfg.tp), int(cfg.pp))
        self._device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                        else torch.device("cpu"))
        self._dtype = cfg.torch_dtype(self._device)
        self._tokenizer = _load_tokenizer(cfg.model_path)
        self.hf_config = AutoConfig.from_pretrained(cfg.model_path, trust_remote_code=cfg.trust_remote_code)
        self.tp_rank, self.tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        self.pp_rank, self.pp_size = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.is_last_stage = self.pp_rank == self.pp_size - 1
        self._value = cfg.model_type == "value"
        self._trainable = cfg.lr > 0
        self._chunk = self._build_chunk()
        self._hf_module = None
        self.global_step = 0
        self.optimizer = None
        self._model = self._chunk
        if self._trainable:
            self._wrap_and_build_optimizer()

    # ------------------------------------------------------------------ setup
    def _build_chunk(self):
        from hybridflow.workers.convert import (build_gpt_model, hf_to_megatron, load_hf_state_dict,
                                                make_transformer_config, model_dims)

        cfg = self.config
        extra = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1} \
            if cfg.gradient_checkpointing else {}
        self.tconfig = make_transformer_config(self.hf_config, tp_size=self.tp_size, pp_size=self.pp_size,
                                               dtype=self._dtype, variable_seq_lengths=True, **extra)
        hf_sd = load_hf_state_dict(cfg.model_path)
        if self._value:  # a value model: no tied output layer; the head replaces output_layer
            self.hf_config.tie_word_embeddings = False
            hf_sd.setdefault("lm_head.weight", hf_sd["model.embed_tokens.weight"])
            # the reward-model / critic checkpoints written by export_hf: model.* + score.*
        chunk = build_gpt_model(self.hf_config, self.tconfig)
        sd = hf_to_megatron(hf_sd, self.hf_config, self.tp_rank, self.tp_size, self.pp_rank, self.pp_size)
        if self._value and self.is_last_stage:
            sd.pop("output_layer.weight", None)
            chunk.output_layer = ValueHead(model_dims(self.hf_config)["hidden"], dtype=self._dtype)
            if "score.weight" in hf_sd:
                sd["output_layer.score.weight"] = hf_sd["score.weight"]
                sd["output_layer.score.bias"] = hf_sd.get("score.bias", torch.zeros(1))
            else:  # a new head, identical on every rank (HF's init: N(0, initializer_range), bias 0)
                gen = torch.Generator().manual_seed(int(cfg.seed))
                std = float(getattr(self.hf_config, "initializer_range", 0.02))
                sd["output_layer.score.weight"] = torch.randn(chunk.output_layer.score.weight.shape,
                                                               generator=gen) * std
                sd["output_layer.score.bias"] = torch.zeros(1)
        sd = {k: v.to(self._dtype) for k, v in sd.items()}
        missing, unexpected = chunk.load_state_dict(sd, strict=False)
        missing = [k for k in missing if "_extra_state" not in k]
        if missing or unexpected:
            raise RuntimeError(f"MegatronEngine: checkpoint/model mismatch: missing {missing}, unexpected {unexpected}")
        return chunk.to(self._device)

    def _wrap_and_build_optimizer(self):
        from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                               finalize_model_grads)
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        cfg = self.config
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                   overlap_grad_reduce=cfg.overlap_grad_reduce,
                                                   use_distributed_optimizer=cfg.use_distributed_optimizer)
        self._model = DistributedDataParallel(config=self.tconfig, ddp_config=ddp_config, module=self._chunk)
        opt_config = OptimizerConfig(
            optimizer="adam", lr=cfg.lr, min_lr=0.0, weight_decay=cfg.weight_decay, adam_beta1=cfg.betas[0],
            adam_beta2=cfg.betas[1], adam_eps=cfg.eps, bf16=self._dtype == torch.bfloat16,
            fp16=self._dtype == torch.float16, params_dtype=self._dtype,
            clip_grad=float(cfg.grad_clip) if cfg.grad_clip is not None and cfg.grad_clip > 0 else 0.0,
            use_distributed_optimizer=cfg.use_distributed_optimizer)
        self.optimizer = get_megatron_optimizer(opt_config, [self._model])
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        self.tconfig.grad_scale_func = self.optimizer.scale_loss
        self.tconfig.no_sync_func = self._model.no_sync
        if cfg.overlap_grad_reduce:
            self.tconfig.grad_sync_func = self._model.start_grad_sync
        self._warmup = cfg.resolved_warmup_steps()

    # ------------------------------------------------------------------ handles
    @property
    def module(self) -> torch.nn.Module:
        """An HF causal-LM module for the rollout; its weights are only present inside
        :meth:`generation_context` (released afterwards)."""
        if self._hf_module is None:
            from transformers import AutoModelForCausalLM

            with torch.random.fork_rng(devices=[]):
                module = AutoModelForCausalLM.from_config(self.hf_config, dtype=self._dtype)
            self._release(module)
            self._hf_module = module.to(self._device)
        return self._hf_module

    @staticmethod
    def _release(module: torch.nn.Module) -> None:
        for p in module.parameters():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    @property
    def megatron_module(self) -> torch.nn.Module:
        """This rank's ``GPTModel`` chunk (unwrapped)."""
        return self._chunk

    @property
    def dispatch_info(self) -> Tuple[int, int, bool]:
        """``(dp_rank, dp_size, collect)`` for ``Worker.set_dispatch_info``: one data chunk per DP
        group; ``collect`` only on TP rank 0 of the last pipeline stage."""
        return self.dp_rank, self.dp_size, self.tp_rank == 0 and self.is_last_stage

    @property
    def lr(self) -> float:
        return self.config.lr * lr_factor(self.global_step, warmup_steps=getattr(self, "_warmup", 0),
                                          total_steps=self.config.total_steps, schedule=self.config.lr_schedule,
                                          min_lr_ratio=self.config.min_lr_ratio)

    # ------------------------------------------------------------------ generation
    @on_cpu
    def generation_state_dict(self) -> Dict[str, torch.Tensor]:
        """The full model in HF names on every rank (naive all-gather over TP × PP; the
        3D-HybridEngine replaces this with micro-DP resharding)."""
        from hybridflow.workers.convert import gather_hf_state_dict

        return gather_hf_state_dict(self._chunk, self.hf_config)

    @contextlib.contextmanager
    def generation_context(self):
        """The full model (generation layout tg = 1) in :attr:`module` for the body, released after.
        ``reshard=micro_dp``: the 3D-HybridEngine (workers/hybrid_engine) all-gathers inside micro-DP
        groups and this rank's training shard becomes part of its generation weights (no second
        copy; no training call may run inside the body). ``naive``: :meth:`generation_state_dict`."""
        module = self.module
        with self._generation_weights() as state:
            try:
                for name, p in module.named_parameters():
                    p.data = state[name].to(device=self._device, dtype=self._dtype)
                yield module
            finally:
                self._release(module)
                state.clear()

    @on_cpu
    def iter_hf_weights(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """``(hf_name, tensor)`` of the full model, one at a time, for a rollout engine that holds
        its own weights (vLLM's weight sync); collective over all ranks. With tied embeddings
        ``lm_head.weight`` is sent too (the embedding): vLLM keeps a stale head otherwise."""
        with self._generation_weights() as state:
            if self.hf_config.tie_word_embeddings and "lm_head.weight" not in state:
                state["lm_head.weight"] = state["model.embed_tokens.weight"]
            yield from state.items()

    @contextlib.contextmanager
    @on_cpu
    def _generation_weights(self):
        if self.config.reshard == "naive":
            yield self.generation_state_dict()
            return
        from hybridflow.workers.hybrid_engine.megatron import MegatronReshard, hf_weights

        if getattr(self, "_reshard", None) is None:  # collective: every rank generates together
            self._reshard = MegatronReshard(self._chunk, tg=1)
        with self._reshard.generation() as gen:
            yield dict(hf_weights(gen, self.hf_config))

    # ------------------------------------------------------------------ batches
    def _check_batch(self, batch: TensorDict) -> None:
        missing = [k for k in ("input_ids", "attention_mask") if k not in batch.keys()]
        if missing:
            raise KeyError(f"MegatronEngine: batch lacks {missing}; it has {list(batch.keys())}")
        if batch.batch_size[0] == 0:
            raise ValueError("MegatronEngine: empty batch")
        length = batch["input_ids"].shape[1]
        if "responses" in batch.keys() and batch["responses"].shape[1] >= length:
            raise ValueError(f"MegatronEngine: responses must be shorter than input_ids ({length} cols)")
        all_token = "responses" not in batch.keys()
        if all_token and "loss_mask" in batch.keys() and batch["loss_mask"].shape[1] != length - 1:
            raise ValueError(f"MegatronEngine: loss_mask must be [B, L-1] = [B, {length - 1}], "
                             f"got {list(batch['loss_mask'].shape)}")

    def _partition(self, batch: TensorDict, train: bool) -> List[List[int]]:
        cfg = self.config
        rows = cfg.micro_batch_size if train else (cfg.forward_micro_batch_size or cfg.micro_batch_size)
        tokens = (cfg.max_tokens_per_micro_batch if train
                  else (cfg.forward_max_tokens_per_micro_batch or cfg.max_tokens_per_micro_batch))
        lengths = batch["attention_mask"].sum(-1).tolist()
        return partition_micro_batches(lengths, micro_batch_size=rows, max_tokens=tokens)

    def _prepare(self, batch: TensorDict, index: List[int]) -> dict:
        """One micro-batch: rows ``index`` on the device, the column window ``[lo, hi)`` that the
        model sees (all-padding edge columns cut, as the FSDP engine does)."""
        mb = batch[torch.tensor(index)].to(self._device)
        attn = mb["attention_mask"]
        real = attn.bool().any(0).nonzero().flatten()
        length = attn.shape[1]
        first, last = (int(real[0]), int(real[-1]) + 1) if len(real) else (0, length)
        if "responses" in mb.keys():
            p = length - mb["responses"].shape[1]
            lo, hi = min(first, p - 1), max(last, p + 1)
        else:
            lo, hi = first, min(max(last, first + 2), length)
        ids = mb["input_ids"][:, lo:hi]
        return {"mb": mb, "lo": lo, "hi": hi, "ids": ids,
                "pos": torch.arange(hi - lo, device=self._device)[None].expand(ids.shape[0], -1),
                "mask": padded_causal_mask(attn[:, lo:hi])}

    def _outputs(self, model_out: torch.Tensor, item: dict, temperature: float, with_entropy: bool) -> dict:
        """Last stage: the engine outputs (module docstring of base.py) from the local logits
        ``[B, hi-lo, V/tp]`` (or values ``[B, hi-lo, 1]``)."""
        mb, lo, hi = item["mb"], item["lo"], item["hi"]
        attn = mb["attention_mask"]
        length = attn.shape[1]
        if "responses" in mb.keys():
            responses = mb["responses"]
            resp_len = responses.shape[1]
            p = length - resp_len
            r_eff = hi - p
            scores = model_out[:, p - 1 - lo:hi - 1 - lo]
            mask, pad = attn[:, p:].to(torch.float32), (0, resp_len - r_eff)
            if self._value:
                return {"values": F.pad(scores.squeeze(-1).float(), pad) * mask}
            lp, ent = vocab_parallel_log_probs(scores, responses[:, :r_eff], temperature, with_entropy)
        else:
            pad = (lo, length - hi)
            if self._value:
                return {"values": F.pad(model_out.squeeze(-1).float(), pad) * attn.to(torch.float32)}
            mask = attn[:, 1:].to(torch.float32)
            lp, ent = vocab_parallel_log_probs(model_out[:, :-1], mb["input_ids"][:, lo + 1:hi], temperature,
                                               with_entropy)
        out = {"log_probs": F.pad(lp, pad) * mask}
        if with_entropy:
            out["entropy"] = F.pad(ent, pad) * mask
        return out

    def _run(self, items: List[dict], loss_func_for, forward_only: bool) -> List[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        queue = iter(items)

        def forward_step(data_iterator, model):
            item = next(data_iterator)
            out = model(item["ids"], item["pos"], item["mask"])
            return out, (lambda output, it=item: loss_func_for(it, output))

        max_len = max(it["ids"].shape[1] for it in items)
        max_rows = max(it["ids"].shape[0] for it in items)
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=queue, model=[self._model], num_microbatches=len(items),
            seq_length=max_len, micro_batch_size=max_rows, forward_only=forward_only)

    # ------------------------------------------------------------------ public compute
    @on_cpu
    def forward(self, batch: TensorDict, *, temperature: float = 1.0, with_entropy: bool = False) -> TensorDict:
        self._check_batch(batch)
        groups = self._partition(batch, train=False)
        items = [self._prepare(batch, g) for g in groups]

        def loss_func(item, output):
            out = self._outputs(output, item, temperature, with_entropy)
            return torch.zeros((), device=self._device), {k: v.detach().cpu() for k, v in out.items()}

        was_training = self._model.training
        self._model.eval()
        try:
            with torch.no_grad():
                stored = self._run(items, loss_func, forward_only=True)
        finally:
            self._model.train(was_training)
        n = batch.batch_size[0]
        keys = ["values"] if self._value else (["log_probs", "entropy"] if with_entropy else ["log_probs"])
        width = (batch["responses"].shape[1] if "responses" in batch.keys()
                 else batch["input_ids"].shape[1] - (0 if self._value else 1))
        result = {k: torch.zeros(n, width, dtype=torch.float32) for k in keys}
        if self.is_last_stage:
            for index, outputs in zip(groups, stored):
                for k in keys:
                    result[k][torch.tensor(index)] = outputs[k]
        return TensorDict(result, batch_size=[n])

    @on_cpu
    def train_batch(self, batch: TensorDict, loss_fn: LossFn, *, temperature: float = 1.0,
                    with_entropy: bool = False, loss_weighting: str = "auto") -> Dict[str, float]:
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        if self.optimizer is None:
            raise RuntimeError("MegatronEngine.train_batch: this engine is frozen (lr == 0: no optimizer)")
        self._check_batch(batch)
        groups = self._partition(batch, train=True)
        loss_weighting, sizes = micro_batch_sizes(batch, groups, loss_weighting, "MegatronEngine")
        local_total = sum(sizes)
        totals = torch.tensor([local_total], dtype=torch.float64, device=self._device)
        if self.dp_size > 1:
            from megatron.core import parallel_state as ps

            dist.all_reduce(totals, group=ps.get_data_parallel_group())
        global_total, count = float(totals[0]), len(groups)
        items = [dict(self._prepare(batch, g), size=s) for g, s in zip(groups, sizes)]
        sums: Dict[str, float] = {}

        def loss_func(item, output):
            out = self._outputs(output, item, temperature, with_entropy)
            loss, metrics = loss_fn(item["mb"], TensorDict(out, batch_size=[item["mb"].batch_size[0]]))
            if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
                raise TypeError("MegatronEngine.train_batch: loss_fn must return (loss tensor with grad, metrics)")
            size = item["size"]
            if loss_weighting == "sum":
                weight, share = float(self.dp_size), 1.0 / count
            else:
                weight = self.dp_size * size / global_total if global_total > 0 else 0.0
                share = size / local_total if local_total > 0 else 1.0 / count
            for name, value in (metrics or {}).items():
                sums[name] = sums.get(name, 0.0) + share * float(value)
            # the schedule divides by the number of micro-batches; DDP averages over dp ranks
            return loss * (weight * count), {}

        lr = self.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._model.train()
        self._model.zero_grad_buffer()
        self.optimizer.zero_grad()
        self._run(items, loss_func, forward_only=False)

        self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        if torch.isfinite(torch.tensor(grad_norm)):
            clip = self.config.grad_clip
            if clip is not None and clip > 0:
                for opt in self.optimizer.chained_optimizers:
                    params = opt.get_parameters()
                    if params:
                        clip_grad_by_total_norm_fp32(params, max_norm=float(clip), total_norm=grad_norm)
            self.optimizer.step_with_ready_grads()
        self.global_step += 1
        return {**sums, "grad_norm": grad_norm, "lr": lr}

    # ------------------------------------------------------------------ state
    def _ckpt_file(self, path: str) -> str:
        return os.path.join(path, f"mp_pp{self.pp_rank}_tp{self.tp_rank}_dp{self.dp_rank}.pt")

    @on_cpu
    def save_checkpoint(self, path: str) -> None:
        """One file per rank: model chunk, optimizer state, ``global_step`` (restorable only into
        the same tp/pp/dp layout; use :meth:`export_hf` to change layouts)."""
        os.makedirs(path, exist_ok=True)
        state = {"model": {k: v for k, v in self._chunk.state_dict().items() if "_extra_state" not in k},
                 "global_step": self.global_step,
                 "layout": (self.tp_size, self.pp_size, self.dp_size)}
        if self.optimizer is not None:
            state["optimizer"] = [opt.optimizer.state_dict() for opt in self.optimizer.chained_optimizers]
            state["main_params"] = [[p.detach().cpu().clone() for p in _main_params(opt)]
                                    for opt in self.optimizer.chained_optimizers]
        torch.save(state, self._ckpt_file(path))
        dist.barrier()

    @on_cpu
    def load_checkpoint(self, path: str) -> None:
        file = self._ckpt_file(path)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"MegatronEngine.load_checkpoint: {file!r} is missing (saved with another "
                                    "tp/pp/dp layout, or not a megatron checkpoint)")
        state = torch.load(file, map_location="cpu", weights_only=False)
        if tuple(state["layout"]) != (self.tp_size, self.pp_size, self.dp_size):
            raise ValueError(f"MegatronEngine.load_checkpoint: saved layout (tp, pp, dp) = {state['layout']}, "
                             f"this run has {(self.tp_size, self.pp_size, self.dp_size)}")
        self._chunk.load_state_dict(state["model"], strict=False)
        if self.optimizer is not None:
            self.optimizer.reload_model_params()  # fp32 main params from the (maybe bf16) model ...
            for opt, sd, mains in zip(self.optimizer.chained_optimizers, state["optimizer"], state["main_params"]):
                opt.optimizer.load_state_dict(sd)
                with torch.no_grad():  # ... then their saved fp32 values (bf16/fp16 runs)
                    for p, saved in zip(_main_params(opt), mains):
                        p.copy_(saved)
        self.global_step = int(state["global_step"])

    @on_cpu
    def export_hf(self, path: str, dtype: Optional[torch.dtype] = None) -> None:
        """Full HF checkpoint (safetensors + config + tokenizer) at ``path``, written by global
        rank 0; every rank must call. Value models are written as
        ``AutoModelForTokenClassification`` (``score`` head), causal LMs with their own class."""
        from hybridflow.workers.convert import gather_hf_state_dict, save_hf_checkpoint

        if self._value:
            state = self._gather_value_state()
        else:
            state = gather_hf_state_dict(self._chunk, self.hf_config, dst_all=False)
        if self._rank == 0 and state is not None:
            if self._value:
                self._save_value(state, path, dtype)
            else:
                gen = None
                if os.path.isfile(os.path.join(self.config.model_path, "generation_config.json")):
                    from transformers import GenerationConfig

                    gen = GenerationConfig.from_pretrained(self.config.model_path)
                save_hf_checkpoint(state, self.hf_config, path, dtype=dtype, tokenizer=self._tokenizer,
                                   generation_config=gen)
        dist.barrier()

    def _gather_value_state(self) -> Optional[Dict[str, torch.Tensor]]:
        from hybridflow.workers.convert import gather_hf_state_dict

        head = self._chunk.output_layer if self.is_last_stage else None
        saved = None
        if head is not None:  # hide the head from the causal-LM mapping, give it a dummy output layer
            saved = {k: v.detach().cpu() for k, v in head.state_dict().items()}
        state = gather_hf_state_dict(_ValueAsLM(self._chunk), self.hf_config)
        objs = [None] * dist.get_world_size()
        dist.all_gather_object(objs, saved)
        score = next(s for s in objs if s is not None)
        state.pop("lm_head.weight", None)
        state["score.weight"], state["score.bias"] = score["score.weight"], score["score.bias"]
        return state

    def _save_value(self, state, path, dtype):
        import copy

        from transformers import AutoModelForTokenClassification

        hf_config = copy.deepcopy(self.hf_config)
        hf_config.num_labels, hf_config.classifier_dropout = 1, 0.0
        cls = AutoModelForTokenClassification._model_mapping[type(hf_config)]
        hf_config.architectures = [cls.__name__]
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        with torch.device("meta"):
            shell = cls(hf_config)
        os.makedirs(path, exist_ok=True)
        shell.save_pretrained(path, state_dict=state, safe_serialization=True)
        if self._tokenizer is not None:
            self._tokenizer.save_pretrained(path)


def _main_params(opt) -> List[torch.Tensor]:
    """The separate fp32 master copies of a megatron optimizer (none for fp32 params, whose
    master weights are the params themselves or views of them)."""
    for attr in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups"):
        groups = getattr(opt, attr, None)
        if groups:
            return [p for group in groups for p in group]
    return []


class _ValueAsLM(torch.nn.Module):
    """A view of a value chunk whose ``state_dict`` looks like an untied causal-LM chunk (the
    head's tensors dropped, a zero-width ``output_layer.weight`` added) for the HF gather."""

    def __init__(self, chunk):
        super().__init__()
        self.chunk = chunk
        self.decoder = chunk.decoder

    def state_dict(self, *args, **kwargs):
        sd = {k: v for k, v in self.chunk.state_dict().items() if not k.startswith("output_layer.")}
        if getattr(self.chunk, "post_process", False):
            sd["output_layer.weight"] = torch.zeros(0, 1)
        return sd
