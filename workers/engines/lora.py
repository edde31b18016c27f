"""LoRA on the FSDP2 engine, with the ``peft`` library (the ``lora`` extra).

``W x`` of each target linear layer becomes ``W x + (alpha / r) · B A x`` (Hu et al. 2021, "LoRA:
Low-Rank Adaptation of Large Language Models"); ``A`` is random, ``B`` starts at 0, so the adapted
model starts as the base model. Only ``A`` and ``B`` (and a value model's new ``score`` head) take
gradients and optimizer state; every base weight stays frozen at the checkpoint's values, which is
what makes the reference free (the same module with the adapters off) and an export simple (the
checkpoint from disk plus the adapters).

- :func:`add_adapters`: the HF model wrapped by ``peft.get_peft_model`` (before sharding);
- :func:`adapters_off`: a context in which the module computes as the base model;
- :func:`merged_weights`: ``(hf_name, W + (alpha / r) · B A)`` of the adapted module, one tensor at a
  time (FSDP2 shards gathered one by one), for a rollout engine with its own weights (vLLM):
  ``changed_only`` yields the merged target matrices alone, all that moves after an update;
- :func:`save_adapter`: the PEFT adapter directory alone (for vLLM's own LoRA loading);
- :func:`export`: a merged HF checkpoint that plain transformers loads, and the PEFT adapter
  directory (``<path>/adapter``) that ``peft.PeftModel.from_pretrained`` loads onto the base.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Tuple

import torch

PREFIX = "base_model.model."
ADAPTER_DIR = "adapter"


def _peft():
    try:
        import peft
    except ImportError as err:  # an optional extra: say how to get it
        raise ImportError("lora.rank > 0 needs the peft library: pip install -e '.[lora]'") from err
    return peft


def lora_config(cfg, value_model: bool):
    """The ``peft.LoraConfig`` of an :class:`~.base.EngineConfig` (``lora_*`` keys)."""
    targets = cfg.lora_target_modules
    targets = list(targets) if isinstance(targets, (list, tuple)) else str(targets)
    return _peft().LoraConfig(r=int(cfg.lora_rank), lora_alpha=float(cfg.lora_alpha),
                              lora_dropout=float(cfg.lora_dropout), target_modules=targets,
                              modules_to_save=["score"] if value_model else None)


def add_adapters(model: torch.nn.Module, cfg, value_model: bool) -> torch.nn.Module:
    """``model`` with LoRA adapters; every other parameter frozen (``requires_grad=False``). The
    random ``A`` matrices come from ``cfg.seed`` (the same on every rank, whatever the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return _peft().get_peft_model(model, lora_config(cfg, value_model))


def is_adapted(module: torch.nn.Module) -> bool:
    return hasattr(module, "disable_adapter") and hasattr(module, "peft_config")


def adapters_off(module: torch.nn.Module):
    """The base model's forward (adapters disabled) inside the block; no-op for a plain module."""
    return module.disable_adapter() if is_adapted(module) else contextlib.nullcontext()


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach()


def _lora_layers(module: torch.nn.Module) -> dict:
    from peft.tuners.lora import LoraLayer

    return {name: layer for name, layer in module.named_modules() if isinstance(layer, LoraLayer)}


def hf_name(peft_name: str) -> str:
    """``base_model.model.model.layers.0.mlp.up_proj.base_layer.weight`` → the base model's name
    ``model.layers.0.mlp.up_proj.weight``."""
    name = peft_name[len(PREFIX):] if peft_name.startswith(PREFIX) else peft_name
    return name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")


def merged_weights(module: torch.nn.Module, changed_only: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
    """The adapted module's weights under the base model's HF names, the adapters merged in (see
    the module docstring). Collective over the ranks when FSDP2-sharded: consume it on every rank."""
    layers = _lora_layers(module)
    for name, layer in layers.items():
        weight = _full(layer.base_layer.weight)
        a, b = _full(layer.lora_A["default"].weight), _full(layer.lora_B["default"].weight)
        scale = layer.scaling["default"]
        yield hf_name(f"{name}.weight"), weight + (b.to(weight.dtype) @ a.to(weight.dtype)) * scale
        if getattr(layer.base_layer, "bias", None) is not None and not changed_only:
            yield hf_name(f"{name}.bias"), _full(layer.base_layer.bias)
    if changed_only:
        return
    inside = tuple(f"{name}." for name in layers)
    for name, tensor in module.state_dict().items():
        if name.startswith(inside) or ".lora_" in name or ".original_module." in name:
            continue  # the merged layers above; peft's own copies
        yield hf_name(name), _full(tensor)


def adapter_state(module: torch.nn.Module) -> dict:
    """The adapter weights (``lora_A``/``lora_B``, a value model's ``score`` head) as full CPU
    tensors under the module's names; collective when FSDP2-sharded (every rank calls)."""
    return {name: _full(t).cpu() for name, t in module.state_dict().items()
            if ".lora_" in name or ".modules_to_save." in name}


def save_adapter(module: torch.nn.Module, cfg, path: str, state: dict | None = None) -> int:
    """Write the PEFT adapter directory at ``path`` (``adapter_config.json`` and
    ``adapter_model.safetensors``, what ``peft.PeftModel.from_pretrained`` and vLLM's LoRA loader
    read) from ``state`` (default: :func:`adapter_state`, collective); returns the bytes written."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = adapter_state(module) if state is None else state
    tensors = {k: v.contiguous() for k, v in get_peft_model_state_dict(module, state_dict=state).items()}
    os.makedirs(path, exist_ok=True)
    config = module.peft_config["default"]
    config.base_model_name_or_path = str(cfg.model_path)
    config.save_pretrained(path)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def export(module: torch.nn.Module, cfg, hf_class: type, path: str, rank: int, dtype=None, tokenizer=None) -> None:
    """Write the merged HF checkpoint to ``path`` and the PEFT adapter to ``path/adapter`` (rank 0
    writes; every rank calls: the adapter weights are gathered). The base comes from
    ``cfg.model_path`` on disk, unchanged by training."""
    peft = _peft()
    adapter = adapter_state(module)
    if rank != 0:
        return
    from transformers import AutoConfig

    save_adapter(module, cfg, os.path.join(path, ADAPTER_DIR), adapter)
    hf_config = AutoConfig.from_pretrained(cfg.model_path, trust_remote_code=cfg.trust_remote_code)
    if cfg.model_type == "value":
        hf_config.num_labels, hf_config.classifier_dropout = 1, 0.0
    base = hf_class.from_pretrained(cfg.model_path, config=hf_config, dtype=torch.float32)
    adapted = peft.get_peft_model(base, lora_config(cfg, cfg.model_type == "value"))
    missing = adapted.load_state_dict(adapter, strict=False).unexpected_keys
    if missing:
        raise RuntimeError(f"LoRA export: adapter weights without a place in the model: {missing[:4]}")
    merged = adapted.merge_and_unload()
    if dtype is not None:
        merged = merged.to(dtype)
    merged.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
