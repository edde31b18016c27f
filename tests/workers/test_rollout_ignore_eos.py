"""``rollout.ignore_eos``: every response is exactly ``max_new_tokens`` long and fully masked.

EOS is not suppressed (vLLM's ``ignore_eos`` semantics): the sampling distribution, hence the
sampled tokens for a fixed seed and the recorded log-probs, are those of a run without it."""
import os

import pytest
import torch
from tensordict import TensorDict

from hybridflow import DataProto
from hybridflow.workers.engines.fsdp import FSDPEngine
from hybridflow.workers.rollout.hf import HFRollout

R = 8
RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    return FSDPEngine({"model_path": tiny_ckpt})


@pytest.fixture(scope="module")
def prompts(engine):
    enc = engine.tokenizer(["1+2=", "what is 7*8?", "hi"], return_tensors="pt", padding=True)
    am = enc["attention_mask"]
    return TensorDict({"input_ids": enc["input_ids"], "attention_mask": am,
                       "position_ids": (am.cumsum(-1) - 1).clamp(min=0)}, batch_size=[3])


@pytest.mark.parametrize("do_sample", [False, True])
def test_eos_does_not_stop_and_mask_covers_everything(engine, prompts, do_sample):
    rollout = HFRollout(engine.module, engine.tokenizer, engine.device)
    opts = dict(n=2, do_sample=do_sample, max_new_tokens=R, seed=11, pad_token_id=0)
    free = rollout.generate(prompts, **opts)
    assert free["response_mask"].all()  # the random model never says <eos> in 8 steps
    eos = int(free["responses"][0, 2])  # a token the model does produce: call it EOS
    stopped = rollout.generate(prompts, eos_token_id=eos, **opts)
    assert stopped["response_mask"][0].sum() <= 3  # without ignore_eos it ends the first response

    out = rollout.generate(prompts, eos_token_id=eos, ignore_eos=True, **opts)
    assert out["responses"].shape == (6, R)
    assert out["response_mask"].dtype == torch.long and out["response_mask"].tolist() == [[1] * R] * 6
    assert torch.equal(out["attention_mask"][:, -R:], out["response_mask"])
    assert torch.equal(out["responses"], free["responses"])  # same tokens: EOS was not suppressed
    assert int(out["responses"][0, 2]) == eos  # ... and decoding went on after it
    assert (out["rollout_log_probs"] < 0).all()
    # the raw-logit log-probs: equal to the trainer's recompute on every token
    torch.testing.assert_close(out["rollout_log_probs"], engine.forward(out)["log_probs"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["rollout_log_probs"], free["rollout_log_probs"], atol=1e-6, rtol=0)


def test_actor_passes_rollout_ignore_eos_through(tiny_ckpt, prompts):
    from hybridflow.config import load_config
    from hybridflow.trainer.settings import typed_rl_settings
    from hybridflow.workers.roles.actor import SAMPLING_KEYS, ActorWorker

    assert "ignore_eos" in SAMPLING_KEYS
    cfg = load_config(os.path.join(RECIPES, "grpo.yaml"),
                      [f"model.path={tiny_ckpt}", "rollout.n=2", f"rollout.max_new_tokens={R}",
                       "rollout.do_sample=false", "rollout.ignore_eos=true"])
    actor = ActorWorker.role(typed_rl_settings(cfg)).instantiate()
    batch = DataProto(prompts.clone())
    free = actor.generate(batch)
    tokenizer = actor.engine.tokenizer
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(free.batch["responses"][0, 2]))  # a token it says
    assert tokenizer.eos_token_id == int(free.batch["responses"][0, 2])

    out = actor.generate(batch)  # rollout.ignore_eos=true from the config
    assert out.batch["responses"].shape == (6, R) and out.batch["response_mask"].all()
    assert torch.equal(out.batch["responses"], free.batch["responses"])

    batch.meta_info["ignore_eos"] = False  # per-call override, like the other sampling keys
    stopped = actor.generate(batch)
    first = int((free.batch["responses"][0] == tokenizer.eos_token_id).nonzero()[0])
    assert stopped.batch["response_mask"][0].tolist() == [1] * (first + 1) + [0] * (R - 1 - first)
