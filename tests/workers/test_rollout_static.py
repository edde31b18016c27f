"""rollout.backend=static (workers/rollout/static.py) on CPU: the eager path of the decode step
that CUDA graphs capture on a GPU.

Checked against the references: HFRollout's greedy tokens, the trainer engine's recomputed
log-probs (FSDPEngine.forward), a 2-rank FSDP2 module over gloo, and a GRPO run end to end.
Run as a script, this file is one rank of the 2-rank test (torchrun-style env, see _launch).
"""
import json
import os
import runpy
import sys
from datetime import timedelta

import pytest
import torch
from tensordict import TensorDict

from hybridflow.workers.engines.fsdp import FSDPEngine
from hybridflow.workers.rollout import build_rollout
from hybridflow.workers.rollout.hf import HFRollout
from hybridflow.workers.rollout.static import StaticRollout, grouped_attention, sample_tokens

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
TEXTS = ["1+2=", "what is 7*8?", "hi", "12345+678="]  # several prompt lengths: left padding differs per row


def _prompts(tokenizer, texts=TEXTS):
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    am = enc["attention_mask"]
    return TensorDict({"input_ids": enc["input_ids"], "attention_mask": am,
                       "position_ids": (am.cumsum(-1) - 1).clamp(min=0)}, batch_size=[len(texts)])


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    """An FSDP2-wrapped engine (one rank keeps the plain module unless asked: shard_single_rank)."""
    return FSDPEngine({"model_path": tiny_ckpt, "shard_single_rank": True})


@pytest.fixture(scope="module")
def prompts(engine):
    return _prompts(engine.tokenizer)


@pytest.fixture(scope="module")
def static(engine):
    return StaticRollout(engine.module, engine.tokenizer, engine.device)


def _same_output(a, b, atol=1e-5):
    for key in ("prompts", "responses", "response_mask", "input_ids", "attention_mask", "position_ids"):
        assert torch.equal(a[key], b[key]), key
    torch.testing.assert_close(a["rollout_log_probs"], b["rollout_log_probs"], atol=atol, rtol=0)


def test_greedy_equals_hf_generate_with_eos_in_the_middle(engine, prompts, static):
    hf = HFRollout(engine.module, engine.tokenizer, engine.device)
    free_hf = hf.generate(prompts, n=2, do_sample=False, max_new_tokens=10)
    free = static.generate(prompts, n=2, do_sample=False, max_new_tokens=10)
    _same_output(free, free_hf)
    assert free["response_mask"].all()  # the random model never says <eos> in 10 greedy steps
    assert torch.equal(free["responses"][::2], free["responses"][1::2])  # n greedy copies, interleaved

    eos = int(free["responses"][0, 3])  # a token row 0 says at step 4: call it EOS
    stop = int((free["responses"][0] == eos).nonzero()[0])
    out = static.generate(prompts, n=2, do_sample=False, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    _same_output(out, hf.generate(prompts, n=2, do_sample=False, max_new_tokens=10, eos_token_id=eos, pad_token_id=0))
    assert out["response_mask"][0].tolist() == [1] * (stop + 1) + [0] * (9 - stop)
    assert out["responses"][0, stop] == eos and (out["responses"][0, stop + 1:] == 0).all()
    assert (out["rollout_log_probs"][out["response_mask"] == 0] == 0).all()
    torch.testing.assert_close(out["rollout_log_probs"], engine.forward(out)["log_probs"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_equal_the_trainers_recompute(engine, prompts, static, temperature):
    engine.module.train()
    out = static.generate(prompts, n=3, temperature=temperature, top_k=20, top_p=0.9, max_new_tokens=12, seed=0)
    assert out.batch_size == torch.Size([12]) and out["responses"].shape == out["rollout_log_probs"].shape == (12, 12)
    torch.testing.assert_close(out["input_ids"], torch.cat([out["prompts"], out["responses"]], 1))
    torch.testing.assert_close(out["position_ids"], (out["attention_mask"].cumsum(-1) - 1).clamp(min=0))
    recomputed = engine.forward(out, temperature=temperature)["log_probs"]
    # log_softmax(raw logits / T) of the token, not the top-k/top-p renormalised one
    torch.testing.assert_close(out["rollout_log_probs"], recomputed, atol=1e-5, rtol=0)
    assert (out["rollout_log_probs"][out["response_mask"].bool()] < 0).all()
    assert engine.module.training  # train mode restored


def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng_alone(prompts, static):
    opts = dict(n=2, max_new_tokens=10, temperature=1.0)
    state = torch.get_rng_state()
    a, b = static.generate(prompts, seed=7, **opts), static.generate(prompts, seed=7, **opts)
    assert torch.equal(torch.get_rng_state(), state)
    _same_output(a, b, atol=0)
    c = static.generate(prompts, seed=8, **opts)
    assert not torch.equal(a["responses"], c["responses"])
    assert not torch.equal(a["responses"][::2], a["responses"][1::2])  # the n samples of a prompt differ


def test_top_k_and_top_p_restrict_the_support():
    gen = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])).repeat(4000, 1)
    opts = dict(greedy=False, temperature=1.0, generator=gen)
    free, _ = sample_tokens(logits, top_k=0, top_p=1.0, **opts)
    assert set(free.tolist()) == {0, 1, 2, 3, 4}
    top2, lp = sample_tokens(logits, top_k=2, top_p=1.0, **opts)
    assert set(top2.tolist()) == {1, 3}
    assert abs(float((top2 == 1).float().mean()) - 0.4 / 0.7) < 0.04  # renormalised over the kept tokens
    torch.testing.assert_close(lp, torch.log(torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15]))[top2])  # ... log-probs are not
    nucleus, _ = sample_tokens(logits, top_k=0, top_p=0.75, **opts)  # 0.4 + 0.3 < 0.75: the third (0.15) is needed
    assert set(nucleus.tolist()) == {1, 3, 4}
    both, _ = sample_tokens(logits, top_k=2, top_p=0.6, **opts)  # top-p acts on the top-k mass: 4/7 + 3/7
    assert set(both.tolist()) == {1, 3}
    both, _ = sample_tokens(logits, top_k=2, top_p=0.5, **opts)  # 4/7 >= 0.5 alone
    assert set(both.tolist()) == {1}
    hot, _ = sample_tokens(logits, top_k=0, top_p=0.3, **opts)  # the most likely token always stays
    assert set(hot.tolist()) == {1}


def test_top_k_1_sampling_gives_the_greedy_tokens_with_temperature_log_probs(engine, prompts, static):
    greedy = static.generate(prompts, do_sample=False, max_new_tokens=8)
    sampled = static.generate(prompts, temperature=0.5, top_k=1, max_new_tokens=8, seed=3)
    assert torch.equal(sampled["responses"], greedy["responses"])
    torch.testing.assert_close(sampled["rollout_log_probs"], engine.forward(sampled, temperature=0.5)["log_probs"],
                               atol=1e-5, rtol=0)
    assert not torch.allclose(sampled["rollout_log_probs"], greedy["rollout_log_probs"])


@pytest.mark.parametrize("do_sample", [False, True])
def test_ignore_eos_gives_full_length_responses(engine, prompts, static, do_sample):
    opts = dict(n=2, do_sample=do_sample, max_new_tokens=8, seed=11, pad_token_id=0)
    free = static.generate(prompts, **opts)
    eos = int(free["responses"][0, 2])
    stopped = static.generate(prompts, eos_token_id=eos, **opts)
    assert stopped["response_mask"][0].sum() <= 3
    out = static.generate(prompts, eos_token_id=eos, ignore_eos=True, **opts)
    assert out["response_mask"].dtype == torch.long and out["response_mask"].tolist() == [[1] * 8] * 8
    assert torch.equal(out["responses"], free["responses"])  # EOS was not suppressed, decoding went on
    torch.testing.assert_close(out["rollout_log_probs"], engine.forward(out)["log_probs"], atol=1e-5, rtol=0)


def test_weight_copy_equals_the_shared_module(engine, prompts, static):
    """``weights=copy`` (the default here: one rank; always with CUDA graphs) decodes on a plain
    copy of the FSDP2 module's weights, ``shared`` on the module itself: same results."""
    copy = static
    assert copy.gather_weights
    shared = StaticRollout(engine.module, engine.tokenizer, engine.device, weights="shared")
    opts = dict(n=2, temperature=0.8, top_p=0.95, max_new_tokens=8, seed=5)
    _same_output(copy.generate(prompts, **opts), shared.generate(prompts, **opts))
    with torch.no_grad():  # the copy is refreshed at every call
        first = copy._copy.state_dict()["model.norm.weight"]
        engine.module.model.norm.weight.to_local().mul_(1.5)
        try:
            _same_output(copy.generate(prompts, **opts), shared.generate(prompts, **opts))
            assert copy._copy.state_dict()["model.norm.weight"].data_ptr() == first.data_ptr()  # storage kept
        finally:
            engine.module.model.norm.weight.to_local().div_(1.5)


def test_a_plain_single_rank_module_decodes_on_itself(tiny_ckpt, prompts, engine):
    """The default one-rank fp32 engine keeps the plain HF module: ``auto`` decodes on it (no copy),
    with the same tokens and log-probs as on the FSDP2-wrapped engine."""
    plain = FSDPEngine({"model_path": tiny_ckpt})
    assert not plain.sharded and engine.sharded
    rollout = StaticRollout(plain.module, plain.tokenizer, plain.device)
    assert not rollout.gather_weights
    opts = dict(n=2, temperature=0.8, top_p=0.95, max_new_tokens=8, seed=5)
    out = rollout.generate(prompts, **opts)
    _same_output(out, StaticRollout(engine.module, engine.tokenizer, engine.device).generate(prompts, **opts))
    torch.testing.assert_close(out["rollout_log_probs"], plain.forward(out, temperature=0.8)["log_probs"],
                               atol=1e-5, rtol=0)


def test_grouped_attention_equals_repeated_kv_and_is_used_only_during_the_call(tiny_ckpt, prompts, static):
    from transformers.integrations.sdpa_attention import repeat_kv

    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(3, h, q, 8, generator=g) for h, q in ((6, 4), (2, 9), (2, 9)))
    mask = torch.rand(3, 1, 4, 9, generator=g) > 0.3
    mask[..., 0] = True
    for q in (4, 1):  # prefill-like and decode-like
        expected = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, :q], repeat_kv(key, 3), repeat_kv(value, 3), attn_mask=mask[:, :, :q], scale=0.3)
        out, _ = grouped_attention(None, query[:, :, :q], key, value, mask[:, :, :q], scaling=0.3)
        torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-6, rtol=0)
    # an eager-attention model decodes the same (the attention function is swapped for the call only)
    eager = FSDPEngine({"model_path": tiny_ckpt, "attn_implementation": "eager"})
    out = StaticRollout(eager.module, eager.tokenizer, eager.device, weights="shared").generate(
        prompts, n=2, temperature=0.9, max_new_tokens=8, seed=1)
    assert eager.module.config._attn_implementation == "eager"
    _same_output(out, static.generate(prompts, n=2, temperature=0.9, max_new_tokens=8, seed=1))
    torch.testing.assert_close(out["rollout_log_probs"], eager.forward(out, temperature=0.9)["log_probs"],
                               atol=1e-5, rtol=0)


def test_selected_by_config_with_clear_errors(engine):
    from hybridflow.config import ConfigError, load_config
    from hybridflow.trainer.settings import typed_rl_settings

    def settings(*overrides):
        return typed_rl_settings(load_config(os.path.join(REPO, "recipes", "grpo.yaml"), list(overrides))).rollout

    rollout = build_rollout("static", engine, settings("rollout.static.cuda_graph=false", "rollout.static.sync_every=4",
                                                       "rollout.static.weights=shared"))
    assert isinstance(rollout, StaticRollout) and rollout.sync_every == 4 and not rollout.use_graph
    assert not rollout.gather_weights
    with pytest.raises(ConfigError, match=r"'rollout.static.weights': 'gathered' is not one of \['auto', 'shared', 'copy'\]"):
        settings("rollout.static.weights=gathered")
    assert not build_rollout("static", engine, settings()).use_graph  # cuda_graph is a no-op on a CPU engine
    with pytest.raises(ConfigError, match="rollout.static.cuda_graphs"):
        settings("rollout.static.cuda_graphs=true")
    with pytest.raises(ValueError, match="sync_every must be >= 1"):
        build_rollout("static", engine, settings("rollout.static.sync_every=0"))
    with pytest.raises(ValueError, match="left-padded"):
        right = TensorDict({"input_ids": torch.tensor([[5, 6, 0]]), "attention_mask": torch.tensor([[1, 1, 0]])},
                           batch_size=[1])
        rollout.generate(right, max_new_tokens=2)


class _ReplayStep:
    """CPU stand-in for the captured graph: ``replay()`` runs the step it would have recorded."""

    def __init__(self, run, generator):
        self.run, self.generator = run, generator

    def replay(self):
        self.run.step(self.generator)


@pytest.mark.parametrize("sync_every", [1, 3])
def test_graph_loop_bookkeeping_on_cpu(engine, prompts, static, monkeypatch, sync_every):
    """The CUDA-graph path's host logic without CUDA: warm-up steps whose effects are undone,
    the generator reseeded after them, replays, an "all done" check only every sync_every steps.
    Same outputs as the eager loop, also when every row stops early. (The capture itself is
    covered by test_cuda_graph_equals_eager_on_gpu.)"""
    graphed = StaticRollout(engine.module, engine.tokenizer, engine.device, sync_every=sync_every)
    graphed.use_graph = True
    captured = []

    def fake_capture(self, run, generator):
        self._warm_up(run, generator)
        captured.append(run)
        return _ReplayStep(run, generator)

    monkeypatch.setattr(StaticRollout, "_capture", fake_capture)
    for opts in (dict(do_sample=False), dict(temperature=0.8, top_k=30, seed=9)):
        _same_output(graphed.generate(prompts, n=2, max_new_tokens=10, **opts),
                     static.generate(prompts, n=2, max_new_tokens=10, **opts), atol=0)
    first = static.generate(prompts, do_sample=False, max_new_tokens=3)["responses"][:, 0]
    eos = first.tolist()  # every row stops after its first token
    out = graphed.generate(prompts, do_sample=False, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    _same_output(out, static.generate(prompts, do_sample=False, max_new_tokens=10, eos_token_id=eos, pad_token_id=0))
    assert out["response_mask"].sum(-1).tolist() == [1] * 4
    assert int(captured[-1].column) == sync_every  # stopped at the first check (step sync_every) after all ended
    # two new tokens: one replay, and the warm-up must not write past the cache's last column P + R - 2
    _same_output(graphed.generate(prompts, do_sample=False, max_new_tokens=2),
                 static.generate(prompts, do_sample=False, max_new_tokens=2), atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_equals_eager_on_gpu(tiny_ckpt):
    engine = FSDPEngine({"model_path": tiny_ckpt, "dtype": "float32"})
    prompts = _prompts(engine.tokenizer)
    graphed = StaticRollout(engine.module, engine.tokenizer, engine.device, cuda_graph=True, sync_every=2)
    eager = StaticRollout(engine.module, engine.tokenizer, engine.device, cuda_graph=False)
    assert graphed.use_graph and graphed.gather_weights
    for opts in (dict(do_sample=False), dict(temperature=0.7, top_k=20, top_p=0.9, seed=4)):
        a = graphed.generate(prompts, n=2, max_new_tokens=12, **opts)
        _same_output(a, eager.generate(prompts, n=2, max_new_tokens=12, **opts), atol=1e-4)
        torch.testing.assert_close(a["rollout_log_probs"], engine.forward(a, temperature=opts.get("temperature", 1.0))
                                   ["log_probs"].cpu(), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------- FSDP2 over 2 gloo ranks
def _rank_main(ckpt: str, work: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=90))
    rank = dist.get_rank()
    torch.set_num_threads(1)
    engine = FSDPEngine({"model_path": ckpt})
    mine = torch.load(os.path.join(work, "prompts.pt"), weights_only=False)[rank:rank + 1]
    static = StaticRollout(engine.module, engine.tokenizer, engine.device)  # auto: shared on 2 ranks
    res = {"world": engine.world_size, "shared": not static.gather_weights}
    greedy = static.generate(mine, n=2, do_sample=False, max_new_tokens=6)
    hf = HFRollout(engine.module, engine.tokenizer, engine.device).generate(mine, n=2, do_sample=False,
                                                                             max_new_tokens=6)
    res["greedy"], res["greedy_equal_hf"] = greedy["responses"], torch.equal(greedy["responses"], hf["responses"])
    # rank 1 ends after one token (its own EOS), rank 0 goes on: the ranks must keep stepping together
    eos = int(greedy["responses"][0, 0]) if rank == 1 else engine.tokenizer.eos_token_id
    res["early_mask"] = static.generate(mine, do_sample=False, max_new_tokens=6, eos_token_id=eos)["response_mask"]
    sampled = static.generate(mine, n=2, temperature=0.7, top_k=50, max_new_tokens=6, seed=rank)
    recomputed = engine.forward(sampled, temperature=0.7)["log_probs"]
    res["gap"] = float((recomputed - sampled["rollout_log_probs"]).abs().max())
    copy = StaticRollout(engine.module, engine.tokenizer, engine.device, weights="copy")  # full_tensor() gathers
    res["copy_equal"] = torch.equal(copy.generate(mine, n=2, temperature=0.7, top_k=50, max_new_tokens=6,
                                                  seed=rank)["responses"], sampled["responses"])
    torch.save(res, os.path.join(work, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_fsdp2_module_sharded_over_two_gloo_ranks(tiny_ckpt, engine, static, tmp_path):
    from tests.gloo_launch import launch  # here: this file is also the ranks' script, run without the repo on sys.path

    prompts = _prompts(engine.tokenizer, ["what is 7*8?", "1+2="])
    torch.save(prompts, tmp_path / "prompts.pt")
    launch(os.path.abspath(__file__), 2, [tiny_ckpt, str(tmp_path)], timeout=240)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["world"] == r1["world"] == 2 and r0["shared"] and r1["shared"]
    single = static.generate(prompts, n=2, do_sample=False, max_new_tokens=6)["responses"]
    assert torch.equal(torch.cat([r0["greedy"], r1["greedy"]]), single)  # sharding changes nothing
    assert r0["greedy_equal_hf"] and r1["greedy_equal_hf"]
    assert r1["early_mask"].tolist() == [[1, 0, 0, 0, 0, 0]] and r0["early_mask"].sum() == 6
    assert r0["gap"] < 1e-5 and r1["gap"] < 1e-5
    assert r0["copy_equal"] and r1["copy_equal"]


# ------------------------------------------------------------------------- a GRPO run end to end
def test_grpo_runs_with_the_static_backend(tiny_ckpt, tmp_path, monkeypatch):
    from hybridflow.trainer.tasks.arithmetic import make_addition_data

    calls, generate = [], StaticRollout.generate
    monkeypatch.setattr(StaticRollout, "generate", lambda self, *a, **kw: calls.append(kw) or generate(self, *a, **kw))
    data = make_addition_data(tmp_path / "data", n_train=64, n_val=8, n_sft=0, digits=2)
    run_dir = tmp_path / "run"
    main = runpy.run_path(os.path.join(REPO, "recipes", "grpo.py"))["main"]
    run = main([f"model.path={tiny_ckpt}", f"data.train={data['train']}", f"data.val={data['val']}",
                f"trainer.run_dir={run_dir}", "data.batch_size=4", "rollout.n=4", "rollout.max_new_tokens=4",
                "trainer.steps=2", "trainer.val_every=2", "trainer.val_before_train=false", "trainer.plot=false",
                "trainer.trackers=[jsonl]", "rollout.backend=static", "rollout.static.sync_every=2"])
    run.close()
    assert [c["n"] for c in calls] == [4, 4, 1]  # two training steps, then the greedy validation
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in train] == [1, 2]
    for row in train:
        assert 0 < row["response_length/mean"] <= 4 and row["timing/gen_s"] > 0 and row["throughput/tokens_per_s"] > 0
        assert row["rollout_corr/log_prob_abs_diff_max"] < 1e-5  # rollout log-probs == the actor's recompute


if __name__ == "__main__":
    _rank_main(sys.argv[1], sys.argv[2])
