"""Distributed side of the conversion: gather a (tp, pp)-sharded megatron model into one HF state
dict, and write HF checkpoints.

:func:`gather_hf_state_dict` is the *naive* full gather (every model-parallel rank ends up with
the whole model on CPU); the 3D-HybridEngine in ``workers/hybrid_engine`` replaces it for
generation with micro-DP resharding.
"""
from __future__ import annotations

import copy
import os
from typing import Dict, Optional

import torch
import torch.distributed as dist

from .hf_megatron import megatron_to_hf

__all__ = ["gather_hf_state_dict", "save_hf_checkpoint", "load_hf_state_dict"]


def _unwrap(model):
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def gather_hf_state_dict(model, hf_config, *, dst_all: bool = True) -> Optional[Dict[str, torch.Tensor]]:
    """Full HF state dict (CPU tensors, the params' dtype) of the megatron ``model`` chunk sharded
    over megatron's current tensor- and pipeline-parallel groups. Every model-parallel rank must
    call; with ``dst_all`` every one of them gets the result, otherwise only model-parallel rank 0
    (others get None). Uses ``all_gather_object`` over the model-parallel group (simple, not fast)."""
    from megatron.core import parallel_state as ps

    local = {k: v.detach().to("cpu") for k, v in _unwrap(model).state_dict().items()
             if "_extra_state" not in k and v is not None and torch.is_tensor(v)}
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    entry = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), local)
    if tp * pp == 1:
        parts = [entry]
    else:
        group = ps.get_model_parallel_group()
        parts = [None] * dist.get_world_size(group)
        if dst_all:
            dist.all_gather_object(parts, entry, group=group)
        else:
            dst = dist.get_global_rank(group, 0)
            dist.gather_object(entry, parts if dist.get_rank() == dst else None, dst=dst, group=group)
            if dist.get_rank() != dst:
                return None
    shards = [[None] * tp for _ in range(pp)]
    for p, t, sd in parts:
        shards[p][t] = sd
    return megatron_to_hf(shards, hf_config)


def load_hf_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """All tensors of the ``*.safetensors`` files of an HF checkpoint dir (CPU, stored dtype)."""
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"load_hf_state_dict: no *.safetensors file in {path!r}")
    out: Dict[str, torch.Tensor] = {}
    for name in files:
        out.update(load_file(os.path.join(path, name)))
    return out


def save_hf_checkpoint(state_dict: Dict[str, torch.Tensor], hf_config, path: str, *,
                       dtype: Optional[torch.dtype] = None, tokenizer=None, generation_config=None) -> None:
    """Write ``state_dict`` as a ``save_pretrained`` checkpoint (safetensors + config) of the
    causal-LM class ``hf_config.architectures[0]`` (default ``AutoModelForCausalLM``'s class)."""
    import transformers
    from transformers import AutoModelForCausalLM

    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    hf_config = copy.deepcopy(hf_config)
    arch = (getattr(hf_config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = AutoModelForCausalLM._model_mapping[type(hf_config)]
    hf_config.architectures = [cls.__name__]
    hf_config.dtype = dtype or next(iter(state_dict.values())).dtype
    with torch.device("meta"):
        shell = cls(hf_config)
    if generation_config is not None:
        shell.generation_config = copy.deepcopy(generation_config)
    if getattr(hf_config, "tie_word_embeddings", False) and "lm_head.weight" not in state_dict:
        state_dict = {**state_dict, "lm_head.weight": state_dict["model.embed_tokens.weight"]}
    os.makedirs(path, exist_ok=True)
    shell.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
