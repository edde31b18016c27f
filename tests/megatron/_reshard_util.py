"""Helpers of the hybrid-engine tests: launching gloo ranks, and a synthetic sharded model.

Run as a script it is one rank of the synthetic test (torchrun-style env): for every layout of
the given world size it shards a random "model" the way megatron does (plain TP splits along
dim 0 or 1, the gated fc1 ``cat(gate_r, up_r)``, replicated norms, tied embedding on the first
and last stage), reshards it with both paths, and checks the result against slices of the full
tensors computed here independently. Results go to ``<work>/synthetic_rank<r>.pt``.
"""
import os
import sys
from datetime import timedelta

# the repository root, so that worker subprocesses (run as scripts) import the shared launcher too
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.gloo_launch import launch  # noqa: E402,F401 (re-exported to the tests)


def ref_shard(full, dim, gated, parts, index):
    """Shard ``index`` of ``parts`` in megatron's TP layout, written independently of the engine."""
    import torch
    if dim is None:
        return full
    if gated:
        half = full.shape[dim] // 2
        gate, up = full.narrow(dim, 0, half), full.narrow(dim, half, half)
        n = half // parts
        return torch.cat([gate.narrow(dim, index * n, n), up.narrow(dim, index * n, n)], dim=dim)
    n = full.shape[dim] // parts
    return full.narrow(dim, index * n, n)


def synthetic_model(layers=4, hidden=8, ffn=16, vocab=24, seed=0):
    """name -> (full tensor, tp_dim, gated, stages predicate); layer i belongs to stage i*pp//layers."""
    import torch
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    model = {"embedding.word_embeddings.weight": (rnd(vocab, hidden), 0, False, "first_last"),
             "decoder.final_layernorm.weight": (rnd(hidden), None, False, "last")}
    for i in range(layers):
        p = f"decoder.layers.{i}."
        model.update({p + "input_layernorm.weight": (rnd(hidden), None, False, i),
                      p + "self_attention.linear_qkv.weight": (rnd(3 * hidden, hidden), 0, False, i),
                      p + "self_attention.linear_qkv.bias": (rnd(3 * hidden), 0, False, i),
                      p + "self_attention.linear_proj.weight": (rnd(hidden, hidden), 1, False, i),
                      p + "mlp.linear_fc1.weight": (rnd(2 * ffn, hidden), 0, True, i),
                      p + "mlp.linear_fc2.weight": (rnd(hidden, ffn), 1, False, i)})
    return model


def local_shards(model, layout, rank, layers=4):
    from hybridflow.workers.hybrid_engine import ShardSpec
    pp_rank, _, tp_rank = layout.train_coords(rank)
    out = []
    for name, (full, dim, gated, where) in model.items():
        if where == "first_last":
            held = pp_rank in (0, layout.pp - 1)
        elif where == "last":
            held = pp_rank == layout.pp - 1
        else:
            held = where * layout.pp // layers == pp_rank
        if held:
            out.append(ShardSpec(name, ref_shard(full, dim, gated, layout.tp, tp_rank).clone(), dim, gated))
    return out


WORLD4_LAYOUTS = [(2, 2, 1, 1), (2, 2, 1, 2), (1, 4, 1, 1), (1, 4, 1, 2), (1, 4, 1, 4), (1, 2, 2, 1),
                  (1, 2, 2, 2), (2, 1, 2, 1), (4, 1, 1, 1), (1, 1, 4, 1)]


def _synthetic_rank(work):
    import torch
    import torch.distributed as dist
    from hybridflow.workers.hybrid_engine import Layout, MicroDPReshard, NaiveReshard

    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, results = dist.get_rank(), {}
    model = synthetic_model()
    for pp, tp, dp, tg in WORLD4_LAYOUTS:
        lay = Layout(pp, tp, dp, tg)
        j = lay.gen_tp_rank(rank)
        want = {n: ref_shard(full, dim, gated, tg, j) for n, (full, dim, gated, _) in model.items()}
        res = {}
        for cls, bucket in ((MicroDPReshard, 1024), (MicroDPReshard, 1 << 20), (NaiveReshard, 1024)):
            shards = local_shards(model, lay, rank)
            before = {s.name: s.tensor.clone() for s in shards}
            eng = cls(lay, bucket_bytes=bucket)
            key = f"{cls.__name__}/{bucket}"
            for step in range(2):  # the second cycle reuses the plan and sees "updated" weights
                gen = eng.to_generation(shards)
                res[key + f"/match{step}"] = sorted(gen) == sorted(want) and all(
                    torch.equal(gen[n], want[n] + step) for n in want)
                res[key + f"/released{step}"] = sum(s.tensor.numel() == 0 for s in shards)
                res[key + f"/stats{step}"] = eng.stats.as_dict()
                eng.to_training()
                res[key + f"/restored{step}"] = all(torch.equal(s.tensor, before[s.name] + step) for s in shards)
                for s in shards:
                    s.tensor.add_(1.0)
        results[(pp, tp, dp, tg)] = res
    torch.save(results, os.path.join(work, f"synthetic_rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def tiny_qwen2(path, tied, seed=0, hidden=64, heads=8, kv_heads=4):
    """A random Qwen2 checkpoint whose shapes split 4 ways: 4 layers, 8 heads / 4 KV groups."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=256, hidden_size=hidden, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
                      tie_word_embeddings=tied, rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).float()
    with torch.no_grad():  # HF initialises biases to 0: make the qkv biases visible to the mapping
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.1)
    model.save_pretrained(path)
    return model


def full_megatron(hf_state, hf_config):
    """The full model in megatron names (tp = pp = 1), with each tensor's (tp_dim, gated)."""
    from hybridflow.workers.convert import hf_to_megatron, tp_split_dim
    full = hf_to_megatron(hf_state, hf_config, 0, 1, 0, 1)
    return {n: (t, tp_split_dim(n), n.endswith("mlp.linear_fc1.weight")) for n, t in full.items()}


PROMPTS = [[5, 77, 130, 9, 201, 44], [250, 3, 18, 96, 140, 7]]
NEW_TOKENS = 6


def _step_batch():
    import torch
    from tensordict import TensorDict
    g = torch.Generator().manual_seed(1)
    prompts, responses = torch.randint(2, 256, (4, 5), generator=g), torch.randint(2, 256, (4, 4), generator=g)
    ids = torch.cat([prompts, responses], 1)
    return TensorDict({"prompts": prompts, "responses": responses, "input_ids": ids,
                       "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(9).expand(4, 9),
                       "response_mask": torch.ones(4, 4)}, batch_size=[4])


def _nll(mb, outputs):
    mask = mb["response_mask"]
    loss = -(outputs["log_probs"] * mask).sum() / mask.sum()
    return loss, {"loss": loss.detach()}


def _megatron_rank(ckpt, work, pp, tp, tgs):
    """One rank of the megatron test: reshard a MegatronEngine's model for every tg, generate
    greedily on the generation layout, take one optimizer step, reshard again."""
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, Qwen2ForCausalLM

    from hybridflow.workers.convert import load_hf_state_dict, megatron_to_hf
    from hybridflow.workers.engines.megatron import MegatronEngine
    from hybridflow.workers.hybrid_engine import Layout, MicroDPReshard, NaiveReshard
    from hybridflow.workers.hybrid_engine.megatron import (MegatronReshard, attach, build_generation_model, detach,
                                                           generation_groups, greedy_generate, hf_weights,
                                                           megatron_shards)

    import time
    t0 = time.perf_counter()
    tick = lambda what: print(f"[{time.perf_counter() - t0:6.1f}s] {what}", flush=True)  # noqa: E731
    engine = MegatronEngine({"model_path": ckpt, "tp": tp, "pp": pp, "lr": 0.05, "grad_clip": None,
                             "weight_decay": 0.0})
    rank, world = dist.get_rank(), dist.get_world_size()
    tick("engine built")
    hf_config = AutoConfig.from_pretrained(ckpt)
    full0 = full_megatron(load_hf_state_dict(ckpt), hf_config)
    prompts = torch.tensor(PROMPTS)
    res = {}
    for tg in tgs:
        lay = Layout(pp, tp, world // (pp * tp), tg)
        j = lay.gen_tp_rank(rank)
        micro, naive = MicroDPReshard(lay, bucket_bytes=64 << 10), NaiveReshard(lay, bucket_bytes=64 << 10)
        tp_group, solo = generation_groups(lay)
        gen_model = build_generation_model(hf_config, lay, tp_group, solo)
        tick(f"tg={tg}: groups and generation model")
        shards = megatron_shards(engine.megatron_module)
        before = {s.name: s.tensor.detach().clone() for s in shards}
        for step in range(2):
            # the full model: from the checkpoint before any update, else the engine's own naive gather
            full = full0 if not res else full_megatron(engine.generation_state_dict(), hf_config)
            want = {n: ref_shard(t, dim, gated, tg, j) for n, (t, dim, gated) in full.items()}
            ref = Qwen2ForCausalLM(hf_config).eval()
            ref.load_state_dict(megatron_to_hf([[{n: t for n, (t, _, _) in full.items()}]], hf_config), strict=False)
            ref_tokens = ref.generate(prompts, max_new_tokens=NEW_TOKENS, do_sample=False,
                                      attention_mask=torch.ones_like(prompts), pad_token_id=0)[:, prompts.shape[1]:]
            del ref
            gen = micro.to_generation(shards)
            r = {"match": sorted(gen) == sorted(want) and all(torch.equal(gen[n], want[n]) for n in want),
                 "stats": micro.stats.as_dict(), "ref_tokens": ref_tokens}
            attach(gen_model, gen)
            r["tokens"] = greedy_generate(gen_model, prompts, NEW_TOKENS)
            detach(gen_model)
            if tg == 1:  # an HF model on the gathered full weights generates the same
                hf = Qwen2ForCausalLM(hf_config).eval()
                weights = dict(hf_weights(gen, hf_config))
                ref_hf = megatron_to_hf([[gen]], hf_config)
                ref_hf.setdefault("lm_head.weight", ref_hf["model.embed_tokens.weight"])  # tied: the same
                r["hf_names"] = sorted(weights) == sorted(ref_hf) and all(
                    torch.equal(weights[n], ref_hf[n]) for n in ref_hf)
                hf.load_state_dict(weights, strict=True)
                out = hf.generate(prompts, max_new_tokens=NEW_TOKENS, do_sample=False,
                                  attention_mask=torch.ones_like(prompts), pad_token_id=0)
                r["hf_tokens"] = out[:, prompts.shape[1]:]
                del hf, out, weights, ref_hf
            del gen
            micro.to_training()
            r["restored"] = all(torch.equal(s.tensor, before[s.name]) for s in shards)
            gen = naive.to_generation(shards)
            r["naive_match"] = all(torch.equal(gen[n], want[n]) for n in want)
            r["naive_stats"] = naive.stats.as_dict()
            del gen
            naive.to_training()
            res[(tg, step)] = r
            tick(f"tg={tg} step={step}: checked")
            if step == 0:  # one optimizer step on the training layout, then reshard again
                r["metrics"] = engine.train_batch(_step_batch(), _nll)
                r["changed"] = any(not torch.equal(s.tensor, before[s.name]) for s in shards)
                before = {s.name: s.tensor.detach().clone() for s in shards}
    # the engine-facing wrapper (megatron's current layout, tg = 1): the full updated model
    full = full_megatron(engine.generation_state_dict(), hf_config)
    with MegatronReshard(engine.megatron_module, tg=1).generation() as gen:
        res["wrapper_match"] = sorted(gen) == sorted(full) and all(torch.equal(gen[n], full[n][0]) for n in full)
    res["wrapper_restored"] = all(torch.equal(s.tensor, before[s.name]) for s in megatron_shards(engine.megatron_module))
    torch.save(res, os.path.join(work, f"mg_pp{pp}tp{tp}_rank{rank}.pt"))
    dist.barrier()
    del engine
    from megatron.core import parallel_state as ps
    ps.destroy_model_parallel()  # the next layout re-initialises megatron in this process


def _megatron_layouts(work, specs):
    """``specs``: ``ckpt:pp:tp:tg,tg`` per training layout, run one after the other in this process
    (one process start-up for all layouts)."""
    for spec in specs:
        ckpt, pp, tp, tgs = spec.rsplit(":", 3)
        _megatron_rank(ckpt, work, int(pp), int(tp), [int(x) for x in tgs.split(",")])


def _vllm_dump_rank(ckpt, work):
    """(pp=2, tp=2) engine, one optimizer step, micro-DP reshard to tg = 1: rank 0 saves the HF
    tensors of its generation shard (``hf_weights``) and the engine's own naive full gather."""
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig

    from hybridflow.workers.engines.megatron import MegatronEngine
    from hybridflow.workers.hybrid_engine.megatron import MegatronReshard, hf_weights

    engine = MegatronEngine({"model_path": ckpt, "tp": 2, "pp": 2, "lr": 0.05, "grad_clip": None,
                             "weight_decay": 0.0})
    engine.train_batch(_step_batch(), _nll)
    reshard = MegatronReshard(engine.megatron_module, tg=1)
    with reshard.generation() as gen:
        if dist.get_rank() == 0:
            torch.save({n: t.clone() for n, t in hf_weights(gen, AutoConfig.from_pretrained(ckpt))},
                       os.path.join(work, "hf_tg1.pt"))
    full = engine.generation_state_dict()
    if dist.get_rank() == 0:
        torch.save(full, os.path.join(work, "hf_ref.pt"))
    dist.barrier()


if __name__ == "__main__":
    if sys.argv[1] == "synthetic":
        _synthetic_rank(sys.argv[2])
    elif sys.argv[1] == "vllm":
        _vllm_dump_rank(sys.argv[2], sys.argv[3])
    else:
        _megatron_layouts(sys.argv[2], sys.argv[3:])
