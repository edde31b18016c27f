"""HF (Qwen2 / Llama naming) ↔ megatron-core GPTModel weights, per (tp, pp) rank.

The mapping (megatron names are those of an unwrapped ``GPTModel`` chunk; layer indices are
local to the pipeline stage, see :func:`~.megatron_model.layer_range`):

=====================================================  ==============================================
HF                                                     megatron (TP split)
=====================================================  ==============================================
``model.embed_tokens.weight``                          ``embedding.word_embeddings.weight`` (dim 0)
``model.layers.i.self_attn.{q,k,v}_proj.{weight,bias}`` ``decoder.layers.j.self_attention.linear_qkv.*``
                                                       fused per KV group ``[q heads, k, v]`` (dim 0)
``model.layers.i.self_attn.o_proj.weight``             ``...self_attention.linear_proj.weight`` (dim 1)
``model.layers.i.mlp.{gate,up}_proj.weight``           ``...mlp.linear_fc1.weight``: rank r holds
                                                       ``cat(gate_r, up_r)`` (see :func:`split_fc1`)
``model.layers.i.mlp.down_proj.weight``                ``...mlp.linear_fc2.weight`` (dim 1)
``model.layers.i.input_layernorm.weight``              ``...input_layernorm.weight`` (replicated)
``model.layers.i.post_attention_layernorm.weight``     ``...pre_mlp_layernorm.weight`` (replicated)
``model.norm.weight``                                  ``decoder.final_layernorm.weight`` (last stage)
``lm_head.weight`` (or embed_tokens when tied)         ``output_layer.weight`` (dim 0, last stage)
=====================================================  ==============================================

With tied embeddings megatron keeps ``output_layer.weight`` only on the last stage when
``pp > 1`` (a copy synchronised with the first stage's embedding); with ``pp == 1`` it has none.
All conversions are pure slicing / concatenation, so HF → megatron → HF is bit-exact.
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .megatron_model import layer_range, model_dims

__all__ = ["tp_split_dim", "split_fc1", "merge_fc1", "fuse_qkv", "unfuse_qkv", "hf_to_megatron",
           "megatron_to_hf", "megatron_stage_keys"]

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_TP_DIMS = {
    "embedding.word_embeddings.weight": 0,
    "output_layer.weight": 0,
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_qkv.bias": 0,
    "self_attention.linear_proj.weight": 1,
    "mlp.linear_fc1.weight": 0,
    "mlp.linear_fc2.weight": 1,
}


def _strip(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def tp_split_dim(megatron_name: str) -> Optional[int]:
    """Dimension along which a megatron parameter is split over tensor-parallel ranks (``0`` or
    ``1``), or ``None`` if it is replicated (norms). ``module.`` prefixes (DDP wrappers) are
    ignored. Note ``mlp.linear_fc1.weight`` is split along dim 0 but *not* as a plain slice of
    the full fused tensor: see :func:`split_fc1`."""
    name = _strip(megatron_name)
    m = _LAYER.match(name)
    key = m.group(2) if m else name
    if key in _TP_DIMS:
        return _TP_DIMS[key]
    if key.endswith("layernorm.weight") or key.endswith("layer_norm_weight"):
        return None
    raise KeyError(f"tp_split_dim: unknown megatron parameter {megatron_name!r}")


def split_fc1(gate: torch.Tensor, up: torch.Tensor, tp_size: int) -> List[torch.Tensor]:
    """The ``linear_fc1`` shard of each TP rank: rank ``r`` holds ``cat(gate_r, up_r)`` where
    ``gate_r``/``up_r`` are the r-th contiguous ``ffn / tp`` row blocks of ``gate_proj``/``up_proj``
    (megatron's SwiGLU splits its local fc1 output in two halves: first half gate, second up)."""
    return [torch.cat([g, u], dim=0) for g, u in zip(gate.chunk(tp_size, 0), up.chunk(tp_size, 0))]


def merge_fc1(shards: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`split_fc1`: ``(gate, up)`` from the TP shards in rank order."""
    halves = [s.chunk(2, dim=0) for s in shards]
    return torch.cat([h[0] for h in halves], 0), torch.cat([h[1] for h in halves], 0)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """Megatron's fused ``linear_qkv`` (weight ``[(heads + 2 kv_heads) d, hidden]`` or bias) from
    HF ``q/k/v``: for each KV group g, ``[q heads of g (heads/kv_heads of them), k_g, v_g]``.
    Groups are contiguous, so TP rank r's shard is the r-th contiguous block of dim 0."""
    per = heads // kv_heads
    tail = q.shape[1:]
    qg = q.reshape(kv_heads, per * (q.shape[0] // heads), *tail)
    kg = k.reshape(kv_heads, k.shape[0] // kv_heads, *tail)
    vg = v.reshape(kv_heads, v.shape[0] // kv_heads, *tail)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *tail)


def unfuse_qkv(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int):
    """Inverse of :func:`fuse_qkv`: ``(q, k, v)`` in HF layout."""
    per = heads // kv_heads
    tail = qkv.shape[1:]
    g = qkv.reshape(kv_heads, (per + 2) * head_dim, *tail)
    q, k, v = g.split([per * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(heads * head_dim, *tail), k.reshape(kv_heads * head_dim, *tail),
            v.reshape(kv_heads * head_dim, *tail))


def _shard(t: torch.Tensor, dim: Optional[int], tp_rank: int, tp_size: int) -> torch.Tensor:
    return t if dim is None else t.chunk(tp_size, dim=dim)[tp_rank]


def megatron_stage_keys(hf_config, pp_rank: int, pp_size: int) -> List[str]:
    """Parameter names of stage ``pp_rank``'s ``GPTModel`` chunk (as :func:`hf_to_megatron` emits)."""
    d = model_dims(hf_config)
    keys = []
    if pp_rank == 0:
        keys.append("embedding.word_embeddings.weight")
    for j, _ in enumerate(layer_range(d["layers"], pp_rank, pp_size)):
        p = f"decoder.layers.{j}."
        keys += [p + "input_layernorm.weight", p + "self_attention.linear_qkv.weight"]
        if d["qkv_bias"]:
            keys.append(p + "self_attention.linear_qkv.bias")
        keys += [p + "self_attention.linear_proj.weight", p + "pre_mlp_layernorm.weight",
                 p + "mlp.linear_fc1.weight", p + "mlp.linear_fc2.weight"]
    if pp_rank == pp_size - 1:
        keys.append("decoder.final_layernorm.weight")
        if not d["tied"] or pp_size > 1:
            keys.append("output_layer.weight")
    return keys


def hf_to_megatron(hf_state_dict: Mapping[str, torch.Tensor], hf_config, tp_rank: int, tp_size: int,
                   pp_rank: int = 0, pp_size: int = 1) -> Dict[str, torch.Tensor]:
    """The megatron state dict of rank ``(tp_rank, pp_rank)``'s model chunk from a full HF state
    dict (Qwen2/Llama names; a ``model.`` / ``lm_head`` layout as ``from_pretrained`` gives).
    Tensors are new contiguous copies; dtypes are kept. Raises ``KeyError`` naming a missing HF
    tensor."""
    d = model_dims(hf_config)

    def get(name: str) -> torch.Tensor:
        if name not in hf_state_dict:
            raise KeyError(f"hf_to_megatron: HF state dict lacks {name!r}")
        return hf_state_dict[name]

    out: Dict[str, torch.Tensor] = {}
    for key in megatron_stage_keys(hf_config, pp_rank, pp_size):
        m = _LAYER.match(key)
        if key == "embedding.word_embeddings.weight":
            t = _shard(get("model.embed_tokens.weight"), 0, tp_rank, tp_size)
        elif key == "output_layer.weight":
            src = "model.embed_tokens.weight" if d["tied"] else "lm_head.weight"
            t = _shard(get(src), 0, tp_rank, tp_size)
        elif key == "decoder.final_layernorm.weight":
            t = get("model.norm.weight")
        else:
            i = layer_range(d["layers"], pp_rank, pp_size)[int(m.group(1))]
            rest, hf = m.group(2), f"model.layers.{i}."
            if rest == "input_layernorm.weight":
                t = get(hf + "input_layernorm.weight")
            elif rest == "pre_mlp_layernorm.weight":
                t = get(hf + "post_attention_layernorm.weight")
            elif rest.startswith("self_attention.linear_qkv."):
                kind = rest.rsplit(".", 1)[1]
                fused = fuse_qkv(*(get(f"{hf}self_attn.{x}_proj.{kind}") for x in "qkv"), d["heads"], d["kv_heads"])
                t = _shard(fused, 0, tp_rank, tp_size)
            elif rest == "self_attention.linear_proj.weight":
                t = _shard(get(hf + "self_attn.o_proj.weight"), 1, tp_rank, tp_size)
            elif rest == "mlp.linear_fc1.weight":
                t = split_fc1(get(hf + "mlp.gate_proj.weight"), get(hf + "mlp.up_proj.weight"), tp_size)[tp_rank]
            else:  # mlp.linear_fc2.weight
                t = _shard(get(hf + "mlp.down_proj.weight"), 1, tp_rank, tp_size)
        out[key] = t.detach().clone().contiguous()
    return out


def megatron_to_hf(shards: Sequence[Sequence[Mapping[str, torch.Tensor]]], hf_config) -> Dict[str, torch.Tensor]:
    """The full HF state dict from every rank's megatron state dict: ``shards[pp_rank][tp_rank]``
    (``module.`` prefixes and ``_extra_state`` entries are ignored). ``lm_head.weight`` is
    emitted only for untied models (tied HF checkpoints store just ``embed_tokens``), which is
    what ``save_pretrained`` writes."""
    d = model_dims(hf_config)
    pp_size, tp_size = len(shards), len(shards[0])
    clean = [[{_strip(k): v for k, v in sd.items() if "_extra_state" not in k} for sd in stage] for stage in shards]
    out: Dict[str, torch.Tensor] = {}

    def cat(stage: int, key: str, dim: int) -> torch.Tensor:
        return torch.cat([clean[stage][r][key] for r in range(tp_size)], dim=dim)

    out["model.embed_tokens.weight"] = cat(0, "embedding.word_embeddings.weight", 0)
    for s in range(pp_size):
        for j, i in enumerate(layer_range(d["layers"], s, pp_size)):
            p, hf = f"decoder.layers.{j}.", f"model.layers.{i}."
            out[hf + "input_layernorm.weight"] = clean[s][0][p + "input_layernorm.weight"]
            kinds = ("weight", "bias") if d["qkv_bias"] else ("weight",)
            for kind in kinds:
                q, k, v = unfuse_qkv(cat(s, p + f"self_attention.linear_qkv.{kind}", 0), d["heads"], d["kv_heads"],
                                     d["head_dim"])
                out[f"{hf}self_attn.q_proj.{kind}"] = q
                out[f"{hf}self_attn.k_proj.{kind}"] = k
                out[f"{hf}self_attn.v_proj.{kind}"] = v
            out[hf + "self_attn.o_proj.weight"] = cat(s, p + "self_attention.linear_proj.weight", 1)
            out[hf + "post_attention_layernorm.weight"] = clean[s][0][p + "pre_mlp_layernorm.weight"]
            gate, up = merge_fc1([clean[s][r][p + "mlp.linear_fc1.weight"] for r in range(tp_size)])
            out[hf + "mlp.gate_proj.weight"], out[hf + "mlp.up_proj.weight"] = gate, up
            out[hf + "mlp.down_proj.weight"] = cat(s, p + "mlp.linear_fc2.weight", 1)
    out["model.norm.weight"] = clean[-1][0]["decoder.final_layernorm.weight"]
    if not d["tied"]:
        out["lm_head.weight"] = cat(pp_size - 1, "output_layer.weight", 0)
    return {k: v.detach().contiguous() for k, v in out.items()}
