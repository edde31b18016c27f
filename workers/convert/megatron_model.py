"""Build a megatron-core ``TransformerConfig`` and ``GPTModel`` from a Hugging Face config.

Supported HF architectures: Qwen2 (``model_type == "qwen2"``, qkv bias) and Llama-style models
(``llama``, ``mistral`` without sliding window, ``qwen3`` is not: it has q/k norms): RMSNorm,
SwiGLU MLP, grouped-query attention, RoPE (default rope type only), optional qkv bias, tied or
untied embeddings. Anything else raises ``ValueError`` naming the unsupported field.

The layer spec is megatron's *local* spec (no Transformer Engine), so the model runs on CPU
(inside :func:`hybridflow.workers.engines.megatron_cpu.cpu_patches`) and on GPU alike.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from hybridflow.workers.engines.megatron_cpu import on_cpu, scoped_forward

__all__ = ["SUPPORTED_MODEL_TYPES", "model_dims", "layer_range", "make_transformer_config", "build_gpt_model"]

SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "mistral")


def _rope_theta(hf_config) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in (None, "default"):
        raise ValueError(f"megatron conversion: rope_type {rope_type!r} is not supported (only default RoPE)")
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def model_dims(hf_config) -> dict:
    """The shape facts of an HF config the mapping needs: ``layers, hidden, heads, kv_heads,
    head_dim, ffn, vocab, qkv_bias, tied, eps, rope_theta, max_positions``. Raises
    ``ValueError`` for an unsupported architecture or option."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"megatron backend: model_type {model_type!r} is not supported; "
                         f"supported: {SUPPORTED_MODEL_TYPES}")
    if getattr(hf_config, "mlp_bias", False):
        raise ValueError("megatron backend: mlp_bias=True is not supported")
    if model_type != "qwen2" and getattr(hf_config, "attention_bias", False):
        raise ValueError("megatron backend: attention_bias=True (o_proj bias) is not supported")
    if getattr(hf_config, "use_sliding_window", False) or (model_type == "mistral"
                                                           and getattr(hf_config, "sliding_window", None)):
        raise ValueError("megatron backend: sliding-window attention is not supported")
    act = getattr(hf_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"megatron backend: hidden_act {act!r} is not supported (only silu)")
    heads = int(hf_config.num_attention_heads)
    hidden = int(hf_config.hidden_size)
    return {
        "layers": int(hf_config.num_hidden_layers), "hidden": hidden, "heads": heads,
        "kv_heads": int(getattr(hf_config, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(hf_config, "head_dim", None) or hidden // heads),
        "ffn": int(hf_config.intermediate_size), "vocab": int(hf_config.vocab_size),
        "qkv_bias": model_type == "qwen2", "tied": bool(getattr(hf_config, "tie_word_embeddings", False)),
        "eps": float(hf_config.rms_norm_eps), "rope_theta": _rope_theta(hf_config),
        "max_positions": int(getattr(hf_config, "max_position_embeddings", 4096)),
    }


def layer_range(num_layers: int, pp_rank: int, pp_size: int) -> range:
    """Global decoder-layer indices held by pipeline stage ``pp_rank`` (an even split, as
    megatron does without a custom layout); ``num_layers`` must divide by ``pp_size``."""
    if num_layers % pp_size:
        raise ValueError(f"megatron backend: num_hidden_layers={num_layers} must divide by pp={pp_size}")
    per = num_layers // pp_size
    return range(pp_rank * per, (pp_rank + 1) * per)


def make_transformer_config(hf_config, *, tp_size: int = 1, pp_size: int = 1,
                            dtype: torch.dtype = torch.float32, **overrides: Any):
    """A megatron ``TransformerConfig`` equivalent to ``hf_config`` for a (tp, pp) layout.

    Compute/param dtype ``dtype`` (fp32, bf16 or fp16); dropout 0; no fused kernels (they need
    CUDA extensions); ``overrides`` are passed through (e.g. ``recompute_granularity``)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    d = model_dims(hf_config)
    if d["heads"] % tp_size or d["kv_heads"] % tp_size:
        raise ValueError(f"megatron backend: tp={tp_size} must divide num_attention_heads={d['heads']} and "
                         f"num_key_value_heads={d['kv_heads']}")
    if d["vocab"] % tp_size:
        raise ValueError(f"megatron backend: tp={tp_size} must divide vocab_size={d['vocab']}")
    if d["ffn"] % tp_size:
        raise ValueError(f"megatron backend: tp={tp_size} must divide intermediate_size={d['ffn']}")
    layer_range(d["layers"], 0, pp_size)  # divisibility check
    kwargs = dict(
        num_layers=d["layers"], hidden_size=d["hidden"], ffn_hidden_size=d["ffn"],
        num_attention_heads=d["heads"], num_query_groups=d["kv_heads"], kv_channels=d["head_dim"],
        normalization="RMSNorm", layernorm_epsilon=d["eps"], gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=d["qkv_bias"], attention_dropout=0.0, hidden_dropout=0.0,
        tensor_model_parallel_size=tp_size, pipeline_model_parallel_size=pp_size,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=True, bias_activation_fusion=False, masked_softmax_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False, batch_p2p_sync=False, variable_seq_lengths=False,
        attention_softmax_in_fp32=True,
    )
    kwargs.update(overrides)
    if kwargs["variable_seq_lengths"]:  # megatron's check; no MoE here, the dispatcher is unused
        kwargs.setdefault("moe_token_dispatcher_type", "alltoall")
    return TransformerConfig(**kwargs)


@on_cpu
def build_gpt_model(hf_config, config, *, pre_process: Optional[bool] = None,
                    post_process: Optional[bool] = None, vp_stage: Optional[int] = None):
    """The ``GPTModel`` chunk of this rank (megatron's parallel_state must be initialised), its
    forward scoped in the CPU patches. ``pre_process``/``post_process`` default to "this is the
    first/last pipeline stage"."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    d = model_dims(hf_config)
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=True)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=True)
    return scoped_forward(GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=d["vocab"], max_sequence_length=d["max_positions"], pre_process=pre_process,
        post_process=post_process, parallel_output=True, share_embeddings_and_output_weights=d["tied"],
        position_embedding_type="rope", rotary_base=d["rope_theta"], rotary_percent=1.0, vp_stage=vp_stage))
