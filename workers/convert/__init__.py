"""HF ↔ megatron-core weight conversion (see hf_megatron.py for the mapping table)."""
from .gather import gather_hf_state_dict, load_hf_state_dict, save_hf_checkpoint
from .hf_megatron import (fuse_qkv, hf_to_megatron, megatron_stage_keys, megatron_to_hf, merge_fc1, split_fc1,
                          tp_split_dim, unfuse_qkv)
from .megatron_model import SUPPORTED_MODEL_TYPES, build_gpt_model, layer_range, make_transformer_config, model_dims

__all__ = ["SUPPORTED_MODEL_TYPES", "build_gpt_model", "fuse_qkv", "gather_hf_state_dict", "hf_to_megatron",
           "layer_range", "load_hf_state_dict", "make_transformer_config", "megatron_stage_keys", "megatron_to_hf",
           "merge_fc1", "model_dims", "save_hf_checkpoint", "split_fc1", "tp_split_dim", "unfuse_qkv"]
