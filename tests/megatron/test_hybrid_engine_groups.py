"""3D-HybridEngine without a model: micro-DP group arithmetic over many layouts, and the bucketed
resharding of a synthetic megatron-style sharded model on 4 gloo ranks (both paths)."""
import itertools
import os

import pytest
import torch
from _reshard_util import WORLD4_LAYOUTS, launch, synthetic_model

from hybridflow.workers.hybrid_engine import Layout

LAYOUTS = [Layout(pp, tp, dp, tg) for pp, tp, dp in itertools.product((1, 2, 3, 4), (1, 2, 4, 8), (1, 2, 3))
           for tg in (1, 2, 4, 8) if tp % tg == 0]


@pytest.mark.parametrize("lay", LAYOUTS, ids=lambda lay: f"pp{lay.pp}tp{lay.tp}dp{lay.dp}tg{lay.tg}")
def test_micro_dp_groups(lay):
    world = set(range(lay.world))
    micro = lay.micro_dp_groups()
    assert sorted(r for g in micro for r in g) == sorted(world)               # a partition of the world
    assert all(len(g) == lay.pp * lay.tp // lay.tg for g in micro)
    for mp in lay.mp_groups():                                               # tg groups per MP group
        inside = [g for g in micro if set(g) <= set(mp)]
        assert len(inside) == lay.tg and sorted(r for g in inside for r in g) == sorted(mp)
    for g in micro:
        j = {lay.gen_tp_rank(r) for r in g}
        assert len(j) == 1                                                   # one generation shard per group
        wanted = lay.train_tp_ranks_of_gen_shard(j.pop())
        cover = sorted((lay.train_coords(r)[0], lay.train_coords(r)[2]) for r in g)
        assert cover == [(p, t) for p in range(lay.pp) for t in wanted]      # all stages x the TP slice, once
        assert [lay.micro_dp_rank(r) for r in g] == list(range(len(g)))
        assert all(g == lay.micro_dp_group(r) for r in g)
    for r in world:                                                          # own training shard inside
        assert lay.train_coords(r)[2] in lay.train_tp_ranks_of_gen_shard(lay.gen_tp_rank(r))

    tpg = lay.gen_tp_groups()
    assert sorted(r for g in tpg for r in g) == sorted(world)
    assert all([lay.gen_tp_rank(r) for r in g] == list(range(lay.tg)) for g in tpg)
    assert all(len({lay.gen_dp_rank(r) for r in g}) == 1 for g in tpg)      # one replica per TP group
    assert sorted((lay.gen_dp_rank(r), lay.gen_tp_rank(r)) for r in world) == \
        [(d, j) for d in range(lay.gen_dp) for j in range(lay.tg)]


@pytest.mark.megatron
def test_rank_order_is_megatrons():
    """Layout's training coordinates agree with megatron's RankGenerator (order "tp-cp-ep-dp-pp")."""
    from megatron.core.parallel_state import RankGenerator
    for lay in LAYOUTS:
        gen = RankGenerator(tp=lay.tp, ep=1, dp=lay.dp, pp=lay.pp, cp=1, order="tp-cp-ep-dp-pp")
        assert sorted(map(sorted, gen.get_ranks("tp-pp"))) == sorted(map(sorted, lay.mp_groups()))
        for ranks in gen.get_ranks("tp"):
            assert [lay.train_coords(r)[2] for r in ranks] == list(range(lay.tp))
        for ranks in gen.get_ranks("pp"):
            assert [lay.train_coords(r)[0] for r in ranks] == list(range(lay.pp))
        for ranks in gen.get_ranks("dp"):
            assert [lay.train_coords(r)[1] for r in ranks] == list(range(lay.dp))


def test_bad_layouts():
    with pytest.raises(ValueError, match="tg=3 must divide"):
        Layout(1, 4, 1, 3)
    with pytest.raises(ValueError, match="pp must be a positive int"):
        Layout(0, 1, 1, 1)
    with pytest.raises(ValueError, match="outside the world"):
        Layout(1, 2, 1, 1).train_coords(2)


def test_synthetic_reshard_four_ranks(tmp_path):
    full_bytes = sum(t.numel() * t.element_size() for t, *_ in synthetic_model().values())
    launch(os.path.join(os.path.dirname(__file__), "_reshard_util.py"), 4, ["synthetic", str(tmp_path)])
    for rank in range(4):
        res = torch.load(tmp_path / f"synthetic_rank{rank}.pt", weights_only=False)
        assert sorted(res) == sorted(WORLD4_LAYOUTS)
        for (pp, tp, dp, tg), r in res.items():
            for key, value in r.items():
                if "/match" in key or "/restored" in key:
                    assert value, f"rank {rank} layout pp{pp} tp{tp} dp{dp} tg{tg}: {key}"
            for step in range(2):
                s = r[f"MicroDPReshard/1024/stats{step}"]
                naive = r[f"NaiveReshard/1024/stats{step}"]
                # memory bound of the engine; the naive path holds the whole model
                assert s["peak_extra_bytes"] <= s["gen_bytes"] - s["train_bytes"] + s["bucket_bytes"]
                assert naive["end_extra_bytes"] >= full_bytes
                # moved, not copied: with tp > tg every TP-split training tensor was released
                assert (r[f"MicroDPReshard/1024/released{step}"] > 0) == (tp > tg)
                assert s["rounds"] > 1 or pp * tp == tg                   # the small bucket needs several rounds
                assert s["bytes_sent"] <= naive["bytes_sent"]


@pytest.mark.parametrize("tg", [1, 2, 4])
def test_vllm_tp_layout(tmp_path, tg):
    """Generation shard j in vLLM's TP-rank-j layout equals what vLLM's own loaders cut from the
    full HF tensors: qkv_proj = [q heads of rank j; k heads; v heads], gate_up = [gate_j; up_j]."""
    from _reshard_util import full_megatron, ref_shard, tiny_qwen2
    from transformers import AutoConfig

    from hybridflow.workers.convert import load_hf_state_dict
    from hybridflow.workers.hybrid_engine.megatron import vllm_tp_weights

    tiny_qwen2(str(tmp_path), tied=False)
    cfg, hf = AutoConfig.from_pretrained(str(tmp_path)), load_hf_state_dict(str(tmp_path))
    full = full_megatron(hf, cfg)
    for j in range(tg):
        gen = {n: ref_shard(t, dim, gated, tg, j) for n, (t, dim, gated) in full.items()}
        got = dict(vllm_tp_weights(gen, cfg, tg))
        cut = lambda t: t.chunk(tg, 0)[j]  # noqa: E731  (vLLM: contiguous blocks of heads / rows)
        for i in range(cfg.num_hidden_layers):
            a = f"model.layers.{i}."
            for kind in ("weight", "bias"):
                want = torch.cat([cut(hf[f"{a}self_attn.{x}_proj.{kind}"]) for x in "qkv"])
                assert torch.equal(got[f"{a}self_attn.qkv_proj.{kind}"], want)
            want = torch.cat([cut(hf[a + "mlp.gate_proj.weight"]), cut(hf[a + "mlp.up_proj.weight"])])
            assert torch.equal(got[a + "mlp.gate_up_proj.weight"], want)
            assert torch.equal(got[a + "self_attn.o_proj.weight"], hf[a + "self_attn.o_proj.weight"].chunk(tg, 1)[j])
            assert torch.equal(got[a + "mlp.down_proj.weight"], hf[a + "mlp.down_proj.weight"].chunk(tg, 1)[j])
        assert torch.equal(got["lm_head.weight"], cut(hf["lm_head.weight"]))
        assert torch.equal(got["model.embed_tokens.weight"], cut(hf["model.embed_tokens.weight"]))
