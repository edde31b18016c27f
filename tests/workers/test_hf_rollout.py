"""HFRollout on the FSDP engine's own module (one rank)."""
import pytest
import torch
from tensordict import TensorDict

from hybridflow.workers.engines.fsdp import FSDPEngine
from hybridflow.workers.rollout.hf import HFRollout


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    return FSDPEngine({"model_path": tiny_ckpt})


@pytest.fixture(scope="module")
def prompts(engine):
    enc = engine.tokenizer(["1+2=", "what is 7*8?", "hi"], return_tensors="pt", padding=True)
    am = enc["attention_mask"]
    return TensorDict({"input_ids": enc["input_ids"], "attention_mask": am,
                       "position_ids": (am.cumsum(-1) - 1).clamp(min=0)}, batch_size=[3])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_log_probs_equal_engine_recompute(engine, prompts, temperature):
    rollout = HFRollout(engine.module, engine.tokenizer, engine.device)
    engine.module.train()
    out = rollout.generate(prompts, n=2, temperature=temperature, top_k=5, top_p=0.9, max_new_tokens=10, seed=0)
    assert out.batch_size == torch.Size([6])
    assert out["responses"].shape == out["rollout_log_probs"].shape == (6, 10)
    assert out["input_ids"].shape == (6, 22)
    torch.testing.assert_close(out["input_ids"], torch.cat([out["prompts"], out["responses"]], 1))
    torch.testing.assert_close(out["position_ids"], (out["attention_mask"].cumsum(-1) - 1).clamp(min=0))
    recomputed = engine.forward(out, temperature=temperature)["log_probs"]
    # the raw-logit log-prob, not the top-k/top-p renormalised one (contracts.md)
    torch.testing.assert_close(out["rollout_log_probs"], recomputed, atol=1e-5, rtol=0)
    assert (out["rollout_log_probs"] < 0).all()
    assert engine.module.training  # train mode restored


def test_interleaving_greedy_determinism_and_seed(engine, prompts):
    rollout = HFRollout(engine.module, engine.tokenizer, engine.device)
    greedy2 = rollout.generate(prompts, n=2, do_sample=False, max_new_tokens=8)
    greedy1 = rollout.generate(prompts, n=1, temperature=0, max_new_tokens=8)
    torch.testing.assert_close(greedy2["prompts"][::2], prompts["input_ids"])
    torch.testing.assert_close(greedy2["prompts"][1::2], prompts["input_ids"])
    assert torch.equal(greedy2["responses"][::2], greedy1["responses"])
    assert torch.equal(greedy2["responses"][1::2], greedy1["responses"])
    torch.testing.assert_close(greedy1["rollout_log_probs"], engine.forward(greedy1)["log_probs"], atol=1e-5, rtol=0)
    a = rollout.generate(prompts, n=2, max_new_tokens=8, seed=7)
    b = rollout.generate(prompts, n=2, max_new_tokens=8, seed=7)
    assert torch.equal(a["responses"], b["responses"])
    assert not torch.equal(a["responses"][::2], a["responses"][1::2])  # samples of one prompt differ


def test_response_mask_stops_at_first_eos(engine, prompts):
    rollout = HFRollout(engine.module, engine.tokenizer, engine.device)
    free = rollout.generate(prompts, do_sample=False, max_new_tokens=8)
    assert free["response_mask"].all()  # the random model never says <eos> in 8 greedy steps
    eos = int(free["responses"][0, 3])  # pretend the 4th greedy token of prompt 0 is EOS
    stop = int((free["responses"][0] == eos).nonzero()[0])
    out = rollout.generate(prompts, do_sample=False, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    assert out["response_mask"][0].tolist() == [1] * (stop + 1) + [0] * (7 - stop)
    assert (out["responses"][0, stop + 1:] == 0).all() and out["responses"][0, stop] == eos
    assert torch.equal(out["attention_mask"][:, -8:], out["response_mask"])
    assert (out["rollout_log_probs"][out["response_mask"] == 0] == 0).all()
    torch.testing.assert_close(out["rollout_log_probs"], engine.forward(out)["log_probs"], atol=1e-5, rtol=0)


def test_model_generation_config_does_not_change_sampling(engine, prompts):
    from transformers import GenerationConfig

    rollout = HFRollout(engine.module, engine.tokenizer, engine.device)
    plain = rollout.generate(prompts, n=2, max_new_tokens=8, seed=3)
    saved = engine.module.generation_config
    engine.module.generation_config = GenerationConfig(top_k=2, repetition_penalty=50.0, eos_token_id=1,
                                                       pad_token_id=0)
    try:
        hub_like = rollout.generate(prompts, n=2, max_new_tokens=8, seed=3)
        assert engine.module.generation_config.top_k == 2  # restored afterwards
    finally:
        engine.module.generation_config = saved
    assert torch.equal(plain["responses"], hub_like["responses"])
