"""FSDP2 training engine over transformers models.

Sharding: ``torch.distributed.fsdp.fully_shard`` on every decoder layer (the classes named in
the model's ``_no_split_modules``) and then on the root, over a 1-D ``DeviceMesh`` of all ranks of
the default process group (initialised here if needed, see :func:`init_distributed`). The
parameters are fp32 master copies; with a bf16/fp16 compute ``dtype`` a
``MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=float32)`` casts them for compute.

Every rank loads the full checkpoint on CPU before sharding (simple; fine up to a few B params).
A group of one rank computing in fp32 keeps the plain module (``shard_single_rank=False``, the
default): FSDP2 would shard nothing there, and its per-layer hooks and DTensor parameters (every
optimizer op dispatched through DTensor) cost more than a small model's compute. The math is the
same; checkpoints (DCP) load across both forms.

Data parallelism: each rank gets its local shard of the batch. FSDP2 averages gradients over the
``D`` ranks, so :meth:`FSDPEngine.train_batch` scales each micro-batch loss by
``D * (micro-batch tokens or rows) / (global tokens or rows)`` (global = all-reduced count): the
update equals that of the token-mean (row-mean) loss over the whole global batch, also when the
shards hold different numbers of tokens. With ``D == 1`` this is the familiar
``micro tokens / batch tokens``; when every shard holds the same number of tokens it equals the
per-rank ``micro / local`` weighting followed by FSDP's plain average (with unequal shards that
plain average would over-weight the tokens of the smaller shards — the global count avoids it).
Every rank runs the same number of micro-batches (the
maximum over ranks; spare ones are zero-weight dummies) because each FSDP forward/backward is a
collective.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import os
import warnings
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tensordict import TensorDict

from hybridflow.worker import init_distributed

from . import lora
from .base import EngineConfig, LossFn, TrainEngine, micro_batch_sizes
from .ops import lr_factor, partition_micro_batches, token_log_probs

__all__ = ["FSDPEngine", "FSDPEngineConfig"]

# FSDP2 warns when a root module returns a view (HF heads do, e.g. the 1-column value head); the
# warning is about in-place ops on that output, which this engine never does. Silenced around the
# engine's own model calls only (no process-wide filter).
_VIEW_WARNING = r"FSDP2-wrapped module .* returned a view tensor"


@dataclasses.dataclass
class FSDPEngineConfig(EngineConfig):
    """:class:`EngineConfig` keys plus ``reshard_after_forward`` (True: free the gathered layer
    weights after each forward and gather again in backward — ZeRO-3; False: keep them — ZeRO-2,
    more memory, less communication) and ``shard_single_rank`` (False: a group of one rank whose
    compute dtype is the fp32 of the master weights keeps the plain module — FSDP2 would shard
    nothing there, and its hooks and DTensor parameters cost more than the compute of a small
    model; True: wrap it anyway)."""

    reshard_after_forward: bool = True
    shard_single_rank: bool = False


def _load_tokenizer(path: str):
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class FSDPEngine(TrainEngine):
    """FSDP2 engine. ``FSDPEngine(config, **overrides)`` with ``config`` a dict, omegaconf node or
    :class:`FSDPEngineConfig` (keys and defaults: see :class:`EngineConfig`)."""

    def __init__(self, config=None, **overrides):
        cfg = FSDPEngineConfig.from_any(config, **overrides)
        self.config = cfg
        if not os.path.isfile(os.path.join(cfg.model_path, "config.json")):
            raise FileNotFoundError(f"FSDPEngine: model_path {cfg.model_path!r} is not a Hugging Face checkpoint "
                                    "directory (no config.json there)")
        self._rank, self._world = init_distributed(timeout_s=1800)
        self._device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                        else torch.device("cpu"))
        self._dtype = cfg.torch_dtype(self._device)
        self._tokenizer = _load_tokenizer(cfg.model_path)

        model = self._load_model()
        self._hf_class = type(model)
        self._keeps_logits = "logits_to_keep" in inspect.signature(type(model).forward).parameters
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.lora = int(cfg.lora_rank) > 0
        if self.lora:  # adapters before sharding: FSDP2 shards base and adapter weights alike
            model = lora.add_adapters(model, cfg, value_model=cfg.model_type == "value")
        self.sharded = self._world > 1 or self._dtype != torch.float32 or cfg.shard_single_rank
        self._module = self._shard(model) if self.sharded else self._plain(model)

        decay, no_decay = [], []
        for p in self._module.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas,
                                           eps=cfg.eps)
        warmup = cfg.resolved_warmup_steps()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, warmup_steps=warmup, total_steps=cfg.total_steps,
                                                   schedule=cfg.lr_schedule, min_lr_ratio=cfg.min_lr_ratio))
        self.global_step = 0

    # ------------------------------------------------------------------ setup
    def _load_model(self) -> torch.nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification

        cfg = self.config
        kwargs = {"dtype": torch.float32, "trust_remote_code": cfg.trust_remote_code}
        if cfg.attn_implementation:
            kwargs["attn_implementation"] = cfg.attn_implementation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # new heads are identical on every rank before sharding
            if cfg.model_type == "causal_lm":
                return AutoModelForCausalLM.from_pretrained(cfg.model_path, **kwargs)
            hf_config = AutoConfig.from_pretrained(cfg.model_path, trust_remote_code=cfg.trust_remote_code)
            hf_config.num_labels = 1
            hf_config.classifier_dropout = 0.0
            return AutoModelForTokenClassification.from_pretrained(cfg.model_path, config=hf_config, **kwargs)

    def _layers(self, model: torch.nn.Module) -> list:
        names = set(getattr(model, "_no_split_modules", None) or [])
        return [m for m in model.modules() if type(m).__name__ in names]

    def _plain(self, model: torch.nn.Module) -> torch.nn.Module:
        """One rank, fp32: the HF module itself on the device (see ``shard_single_rank``)."""
        model = model.to(self._device)
        if self.config.compile:
            for layer in self._layers(model):
                layer.forward = torch.compile(layer.forward)
        return model

    def _shard(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self._mesh = init_device_mesh(self._device.type, (self._world,))
        mp = (MixedPrecisionPolicy(param_dtype=self._dtype, reduce_dtype=torch.float32)
              if self._dtype != torch.float32 else MixedPrecisionPolicy())
        kw = {"mesh": self._mesh, "mp_policy": mp, "reshard_after_forward": self.config.reshard_after_forward}
        for layer in self._layers(model):
            fully_shard(layer, **kw)
            if self.config.compile:  # the forward only: FSDP2's hooks around it stay eager
                layer.forward = torch.compile(layer.forward)
        # with LoRA the HF model inside peft's wrapper is the root: PeftModel.generate calls it
        # directly, and the root's hooks must run for its own (embedding, head) parameters
        fully_shard(model.get_base_model() if lora.is_adapted(model) else model, **kw)
        return model

    # ------------------------------------------------------------------ handles
    @property
    def module(self) -> torch.nn.Module:
        return self._module

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def adapters_off(self):
        """With LoRA, the base model's forward inside the block (the reference for free); else a no-op."""
        return lora.adapters_off(self._module)

    def iter_hf_weights(self, changed_only: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
        """``(hf_name, full tensor)`` one at a time, for a rollout engine with its own weights (vLLM):
        the state dict; with LoRA the adapters merged in, and ``changed_only`` the merged target
        matrices alone (the only weights an update moves). Every rank must consume it."""
        if self.lora:
            yield from lora.merged_weights(self._module, changed_only)
            return
        for name, tensor in self._module.state_dict().items():
            yield name, (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach()

    def save_adapter(self, path: str) -> int:
        """LoRA only: the PEFT adapter directory at ``path`` on every rank (the gather is
        collective: every rank calls, each with its own ``path``); returns the bytes written."""
        if not self.lora:
            raise RuntimeError("FSDPEngine.save_adapter: this engine has no LoRA adapters (lora_rank=0)")
        return lora.save_adapter(self._module, self.config, path)

    # ------------------------------------------------------------------ batches
    def _check_batch(self, batch: TensorDict) -> None:
        missing = [k for k in ("input_ids", "attention_mask") if k not in batch.keys()]
        if missing:
            raise KeyError(f"FSDPEngine: batch lacks {missing}; it has {list(batch.keys())}")
        if batch.batch_size[0] == 0:
            raise ValueError("FSDPEngine: empty batch")
        length = batch["input_ids"].shape[1]
        if "responses" in batch.keys():
            resp = batch["responses"].shape[1]
            if resp >= length:
                raise ValueError(f"FSDPEngine: responses ({resp} cols) must be shorter than input_ids ({length} cols)")
        elif "loss_mask" in batch.keys() and batch["loss_mask"].shape[1] != length - 1:
            raise ValueError(f"FSDPEngine: loss_mask must be [B, L-1] = [B, {length - 1}] (aligned with the targets "
                             f"input_ids[:, 1:]), got {list(batch['loss_mask'].shape)}")

    def _all_reduce(self, values: List[float], op=dist.ReduceOp.SUM) -> List[float]:
        if self._world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def _partition(self, batch: TensorDict, train: bool) -> List[Optional[List[int]]]:
        cfg = self.config
        rows = cfg.micro_batch_size if train else (cfg.forward_micro_batch_size or cfg.micro_batch_size)
        tokens = (cfg.max_tokens_per_micro_batch if train
                  else (cfg.forward_max_tokens_per_micro_batch or cfg.max_tokens_per_micro_batch))
        lengths = batch["attention_mask"].sum(-1).tolist()
        groups = partition_micro_batches(lengths, micro_batch_size=rows, max_tokens=tokens)
        count = int(self._all_reduce([len(groups)], dist.ReduceOp.MAX)[0])
        if count != len(groups):
            groups = partition_micro_batches(lengths, micro_batch_size=rows, max_tokens=tokens,
                                             num_micro_batches=count)
        return groups

    def _rows(self, batch: TensorDict, index: Optional[List[int]]) -> TensorDict:
        return batch[torch.tensor(index if index is not None else [0])].to(self._device)

    # ------------------------------------------------------------------ model call
    def _compute(self, mb: TensorDict, temperature: float, with_entropy: bool) -> TensorDict:
        """Outputs of one micro-batch (with grad if enabled). Leading/trailing columns without any
        real token are cut off before the model call; outputs are zero-padded back and are 0
        where ``attention_mask`` is 0."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_VIEW_WARNING)
            return self._compute_outputs(mb, temperature, with_entropy)

    def _compute_outputs(self, mb: TensorDict, temperature: float, with_entropy: bool) -> TensorDict:
        attn = mb["attention_mask"]
        pos = mb["position_ids"] if "position_ids" in mb.keys() else _position_ids(attn)
        if self.config.remove_padding:
            return TensorDict(self._packed_outputs(mb, pos, temperature, with_entropy), batch_size=[attn.shape[0]])
        real = attn.bool().any(0).nonzero().flatten()
        length = attn.shape[1]
        first, last = (int(real[0]), int(real[-1]) + 1) if len(real) else (0, length)
        if "responses" in mb.keys():
            out = self._response_outputs(mb, pos, first, last, temperature, with_entropy)
        else:
            out = self._all_token_outputs(mb, pos, first, last, temperature, with_entropy)
        return TensorDict(out, batch_size=[attn.shape[0]])

    def _response_outputs(self, mb, pos, first, last, temperature, with_entropy) -> Dict[str, torch.Tensor]:
        input_ids, attn, responses = mb["input_ids"], mb["attention_mask"], mb["responses"]
        resp_len = responses.shape[1]
        p = input_ids.shape[1] - resp_len
        lo, hi = min(first, p - 1), max(last, p + 1)  # keep position p-1 (predicts responses[:, 0])
        r_eff = hi - p  # response columns computed; the rest are padding in this micro-batch
        value = self.config.model_type == "value"
        kwargs = {"logits_to_keep": r_eff + 1} if (not value and self._keeps_logits) else {}
        res = self._module(input_ids=input_ids[:, lo:hi], attention_mask=attn[:, lo:hi],
                           position_ids=pos[:, lo:hi], use_cache=False, **kwargs)
        # we need the outputs at sequence positions p-1 .. hi-2 (model column c = position lo + c)
        scores = res.logits[:, -(r_eff + 1):-1] if kwargs else res.logits[:, p - 1 - lo:hi - 1 - lo]
        mask, pad = attn[:, p:].to(torch.float32), (0, resp_len - r_eff)
        if value:
            return {"values": F.pad(scores.squeeze(-1).float(), pad) * mask}
        lp, ent = token_log_probs(scores, responses[:, :r_eff], temperature, with_entropy)
        out = {"log_probs": F.pad(lp, pad) * mask}
        if with_entropy:
            out["entropy"] = F.pad(ent, pad) * mask
        return out

    def _all_token_outputs(self, mb, pos, first, last, temperature, with_entropy) -> Dict[str, torch.Tensor]:
        input_ids, attn = mb["input_ids"], mb["attention_mask"]
        length = input_ids.shape[1]
        lo, hi = first, min(max(last, first + 2), length)
        res = self._module(input_ids=input_ids[:, lo:hi], attention_mask=attn[:, lo:hi],
                           position_ids=pos[:, lo:hi], use_cache=False)
        pad = (lo, length - hi)
        if self.config.model_type == "value":
            return {"values": F.pad(res.logits.squeeze(-1).float(), pad) * attn.to(torch.float32)}
        mask = attn[:, 1:].to(torch.float32)  # target token t+1 is real
        lp, ent = token_log_probs(res.logits[:, :-1], input_ids[:, lo + 1:hi], temperature, with_entropy)
        out = {"log_probs": F.pad(lp, pad) * mask}
        if with_entropy:
            out["entropy"] = F.pad(ent, pad) * mask
        return out

    def _packed_outputs(self, mb, pos, temperature, with_entropy) -> Dict[str, torch.Tensor]:
        """``remove_padding``: the micro-batch's real tokens packed into one row ``[1, T]`` with
        ``position_ids`` restarting at 0 for every sequence and ``attention_mask=None``, which
        transformers turns into a block-diagonal causal mask (varlen kernels with flash-attention).
        No compute is spent on padding. Outputs are scattered back to ``[B, L]``: column ``t``
        holds the prediction made at token ``t`` (of token ``t + 1``), then sliced as the padded
        path slices them (responses: columns ``P-1 .. P+R-2``)."""
        input_ids, attn = mb["input_ids"], mb["attention_mask"].bool()
        ids = input_ids[attn]
        res = self._module(input_ids=ids[None], position_ids=pos[attn][None], attention_mask=None,
                           use_cache=False)
        value = self.config.model_type == "value"

        def unpack(x: torch.Tensor) -> torch.Tensor:  # [T] at the real tokens -> [B, L]
            return torch.zeros(attn.shape, dtype=x.dtype, device=x.device).masked_scatter(attn, x)

        if value:
            outputs = {"values": unpack(res.logits[0, :, 0].float())}
        else:  # label of packed token j is token j + 1; wrong across sequence ends, masked below
            lp, ent = token_log_probs(res.logits[0], ids.roll(-1), temperature, with_entropy)
            outputs = {"log_probs": unpack(lp)}
            if with_entropy:
                outputs["entropy"] = unpack(ent)
        if "responses" in mb.keys():
            resp_len = mb["responses"].shape[1]
            p = attn.shape[1] - resp_len
            mask = attn[:, p:].to(torch.float32)
            return {k: v[:, p - 1:p - 1 + resp_len] * mask for k, v in outputs.items()}
        if value:
            return {"values": outputs["values"] * attn.to(torch.float32)}
        mask = attn[:, 1:].to(torch.float32)  # target token t+1 is real
        return {k: v[:, :-1] * mask for k, v in outputs.items()}

    # ------------------------------------------------------------------ public compute
    def forward(self, batch: TensorDict, *, temperature: float = 1.0, with_entropy: bool = False) -> TensorDict:
        self._check_batch(batch)
        groups = self._partition(batch, train=False)
        parts, was_training = [], self._module.training
        self._module.eval()
        try:
            with torch.no_grad():
                for index in groups:
                    outputs = self._compute(self._rows(batch, index), temperature, with_entropy)
                    if index is not None:
                        parts.append((index, outputs.to("cpu")))
        finally:
            self._module.train(was_training)
        n = batch.batch_size[0]
        result = {}
        for key in parts[0][1].keys():
            full = torch.zeros((n,) + tuple(parts[0][1][key].shape[1:]), dtype=torch.float32)
            for index, outputs in parts:
                full[torch.tensor(index)] = outputs[key]
            result[key] = full
        return TensorDict(result, batch_size=[n])

    def train_batch(self, batch: TensorDict, loss_fn: LossFn, *, temperature: float = 1.0,
                    with_entropy: bool = False, loss_weighting: str = "auto") -> Dict[str, float]:
        self._check_batch(batch)
        groups = self._partition(batch, train=True)
        loss_weighting, sizes = micro_batch_sizes(batch, groups, loss_weighting, "FSDPEngine")
        local_total = sum(sizes)
        global_total = self._all_reduce([local_total])[0]
        real_groups = sum(g is not None for g in groups)

        self._module.train()
        sums: Dict[str, float] = {}
        for index, size in zip(groups, sizes):
            mb = self._rows(batch, index)
            outputs = self._compute(mb, temperature, with_entropy)
            if index is None:  # dummy: keeps the FSDP collectives aligned across ranks
                (sum(v.sum() for v in outputs.values()) * 0.0).backward()
                continue
            loss, metrics = loss_fn(mb, outputs)
            if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
                raise TypeError("FSDPEngine.train_batch: loss_fn must return (loss tensor with grad, metrics dict)")
            if loss_weighting == "sum":
                weight, share = float(self._world), 1.0 / real_groups
            else:
                weight = self._world * size / global_total if global_total > 0 else 0.0
                share = size / local_total if local_total > 0 else 1.0 / real_groups
            (loss * weight).backward()
            for name, value in (metrics or {}).items():
                sums[name] = sums.get(name, 0.0) + share * float(value)

        grad_norm = self._clip_grad_norm()
        lr = self.lr
        stepped = bool(torch.isfinite(torch.tensor(grad_norm)))
        if stepped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if stepped:
            self.scheduler.step()
        else:  # the schedule follows the step count even when a step is skipped: silence torch's hint
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.scheduler.step()
        self.global_step += 1
        return {**sums, "grad_norm": grad_norm, "lr": lr}

    def _clip_grad_norm(self) -> float:
        clip = self.config.grad_clip
        max_norm = float(clip) if clip is not None and clip > 0 else float("inf")
        params = [p for p in self._module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    # ------------------------------------------------------------------ state
    def save_checkpoint(self, path: str) -> None:
        """DCP checkpoint of ``{"model", "optimizer", "extra": {"scheduler", "global_step"}}``."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self._module, self.optimizer)
        state = {"model": model_sd, "optimizer": optim_sd,
                 "extra": {"scheduler": self.scheduler.state_dict(), "global_step": self.global_step}}
        dcp.save(state, checkpoint_id=path)

    def load_checkpoint(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        if not os.path.isfile(os.path.join(path, ".metadata")):
            raise FileNotFoundError(f"FSDPEngine.load_checkpoint: {path!r} holds no DCP checkpoint (no .metadata)")
        model_sd, optim_sd = get_state_dict(self._module, self.optimizer)
        state = {"model": model_sd, "optimizer": optim_sd,
                 "extra": {"scheduler": self.scheduler.state_dict(), "global_step": 0}}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(self._module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        self.scheduler.load_state_dict(state["extra"]["scheduler"])
        self.global_step = int(state["extra"]["global_step"])

    def export_hf(self, path: str, dtype: Optional[torch.dtype] = None) -> None:
        """Full HF checkpoint at ``path`` (rank 0 writes; every rank must call). ``dtype``: weights'
        dtype on disk (None = the fp32 master weights). The model class is the original HF one
        (``config.architectures`` names it, not FSDP's wrapper class)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if self.lora:  # the merged model, and the adapter in path/adapter (workers/engines/lora.py)
            lora.export(self._module, self.config, self._hf_class, path, self._rank, dtype, self._tokenizer)
            if self._world > 1:
                dist.barrier()
            return
        state = get_model_state_dict(self._module,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self._rank == 0:
            os.makedirs(path, exist_ok=True)
            if dtype is not None:
                state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
            hf_config = copy.deepcopy(self._module.config)
            hf_config.architectures = [self._hf_class.__name__]
            hf_config.dtype = dtype or torch.float32
            with torch.device("meta"):
                shell = self._hf_class(hf_config)
            if getattr(self._module, "generation_config", None) is not None:  # causal LMs only
                shell.generation_config = copy.deepcopy(self._module.generation_config)
            shell.save_pretrained(path, state_dict=state, safe_serialization=True)
            if self._tokenizer is not None:
                self._tokenizer.save_pretrained(path)
        if self._world > 1:
            dist.barrier()
