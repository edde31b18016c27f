"""HF ↔ megatron conversion: bit-exact round trips over (tp, pp) layouts, the public sharding
helpers, and megatron logits == transformers logits (TP=1, in this process)."""
import pytest
import torch

from _mg_common import mg_single  # noqa: F401  (fixture)
from hybridflow.workers.convert import (fuse_qkv, hf_to_megatron, megatron_stage_keys, megatron_to_hf, merge_fc1,
                                        split_fc1, tp_split_dim, unfuse_qkv)

pytestmark = pytest.mark.megatron


def _hf_model(kind, tied):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=tied, max_position_embeddings=32)
    torch.manual_seed(0)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**kw))
    return LlamaForCausalLM(LlamaConfig(**kw))


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_round_trip_bit_exact(kind, tied, tp, pp):
    model = _hf_model(kind, tied)
    sd = model.state_dict()
    shards = [[hf_to_megatron(sd, model.config, t, tp, p, pp) for t in range(tp)] for p in range(pp)]
    for p in range(pp):
        assert sorted(shards[p][0]) == sorted(megatron_stage_keys(model.config, p, pp))
    qkv_bias = [k for k in shards[0][0] if k.endswith("linear_qkv.bias")]
    assert bool(qkv_bias) == (kind == "qwen2")
    back = megatron_to_hf(shards, model.config)
    expected = {k: v for k, v in sd.items() if not (tied and k == "lm_head.weight")}
    assert sorted(back) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(back[k], v), k


def test_shard_shapes_and_split_dims():
    model = _hf_model("qwen2", False)
    full = hf_to_megatron(model.state_dict(), model.config, 0, 1)
    halves = [hf_to_megatron(model.state_dict(), model.config, r, 2) for r in range(2)]
    for name, tensor in full.items():
        dim = tp_split_dim("module." + name)
        if dim is None:
            assert torch.equal(halves[1][name], tensor)
        else:
            assert halves[0][name].shape[dim] * 2 == tensor.shape[dim]
            if "linear_fc1" not in name:  # fc1 is not a plain slice: see split_fc1
                assert torch.equal(torch.cat([h[name] for h in halves], dim), tensor), name
    fc1 = "decoder.layers.0.mlp.linear_fc1.weight"
    assert not torch.equal(torch.cat([h[fc1] for h in halves], 0), full[fc1])
    gate, up = model.model.layers[0].mlp.gate_proj.weight, model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(halves[1][fc1], torch.cat([gate[12:], up[12:]]))
    assert all(torch.equal(a, b) for a, b in zip(merge_fc1(split_fc1(gate, up, 2)), (gate, up)))
    with pytest.raises(KeyError):
        tp_split_dim("decoder.layers.0.mystery.weight")


def test_qkv_fuse_layout():
    heads, kv, d, h = 4, 2, 3, 5
    q, k, v = torch.randn(heads * d, h), torch.randn(kv * d, h), torch.randn(kv * d, h)
    fused = fuse_qkv(q, k, v, heads, kv)
    # group 0 = [q heads 0, 1 | k head 0 | v head 0]
    assert torch.equal(fused[:2 * d], q[:2 * d]) and torch.equal(fused[2 * d:3 * d], k[:d])
    assert torch.equal(fused[3 * d:4 * d], v[:d]) and torch.equal(fused[4 * d:6 * d], q[2 * d:])
    assert all(torch.equal(a, b) for a, b in zip(unfuse_qkv(fused, heads, kv, d), (q, k, v)))


def test_unsupported_config_is_named():
    from transformers import LlamaConfig

    from hybridflow.workers.convert import model_dims

    with pytest.raises(ValueError, match="mlp_bias"):
        model_dims(LlamaConfig(mlp_bias=True))
    with pytest.raises(ValueError, match="rope_type"):
        model_dims(LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 2.0}))


@pytest.mark.parametrize("tied", [True, False])
def test_megatron_logits_match_transformers(tied, mg_single):
    from hybridflow.workers.convert import build_gpt_model, make_transformer_config

    model = _hf_model("qwen2", tied).eval()
    chunk = build_gpt_model(model.config, make_transformer_config(model.config))
    missing, unexpected = chunk.load_state_dict(hf_to_megatron(model.state_dict(), model.config, 0, 1), strict=False)
    assert not unexpected and all("_extra_state" in k for k in missing)
    ids = torch.randint(0, 32, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = chunk(ids, torch.arange(10)[None].expand(2, -1), None)
        ref = model(input_ids=ids).logits
    gap = float((ours - ref).abs().max())
    assert gap < 1e-5
    # the mapping test can fail: swapping gate and up changes the logits
    sd = hf_to_megatron(model.state_dict(), model.config, 0, 1)
    fc1 = "decoder.layers.0.mlp.linear_fc1.weight"
    sd[fc1] = torch.cat(sd[fc1].chunk(2)[::-1])
    chunk.load_state_dict(sd, strict=False)
    with torch.no_grad():
        swapped = float((chunk(ids, torch.arange(10)[None].expand(2, -1), None) - ref).abs().max())
    assert swapped > 100 * max(gap, 1e-7)  # far above float noise (a random tiny model: small weights)
