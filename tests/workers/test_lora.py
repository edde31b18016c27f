"""LoRA on the FSDP2 engine (workers/engines/lora.py, the ``lora`` extra): only the adapters train,
the adapters-off module is the base model, checkpoints resume exactly, and the export (merged HF
checkpoint + PEFT adapter) gives the adapted module's greedy tokens."""
from __future__ import annotations

import pytest
import torch

from hybridflow.workers.engines.fsdp import FSDPEngine

pytestmark = pytest.mark.lora

LORA = {"lora_rank": 4, "lora_alpha": 8.0, "lr": 0.5, "eps": 1.0, "weight_decay": 0.0, "grad_clip": None}


def state(engine):
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in engine.module.state_dict().items()}


def trained(tiny_ckpt, batch, loss, steps=2, **extra):
    engine = FSDPEngine({"model_path": tiny_ckpt, **LORA, **extra})
    for _ in range(steps):
        engine.train_batch(batch, loss)
    return engine


@pytest.fixture(scope="module")
def batch(make_rl_batch):
    return make_rl_batch([6, 3, 5, 2], [5, 2, 4, 1])


@pytest.mark.parametrize("shard", [False, True], ids=["plain", "fsdp2"])
def test_only_the_adapters_train(tiny_ckpt, batch, nll_loss, shard):
    engine = FSDPEngine({"model_path": tiny_ckpt, **LORA, "shard_single_rank": shard})
    before = state(engine)
    engine.train_batch(batch, nll_loss)
    after = state(engine)
    lora_keys = [k for k in before if ".lora_" in k]
    assert len(lora_keys) == 28  # A and B of the 14 linear layers (attention and MLP, 2 layers)
    # B starts at 0, so the first step moves B only (A's gradient is Bᵀ·...); the second moves A too
    assert all(not torch.equal(before[k], after[k]) for k in lora_keys if ".lora_B." in k)
    assert all(torch.equal(before[k], after[k]) for k in lora_keys if ".lora_A." in k)
    engine.train_batch(batch, nll_loss)
    assert all(not torch.equal(after[k], v) for k, v in state(engine).items() if ".lora_A." in k)
    assert all(torch.equal(before[k], v) for k, v in state(engine).items() if ".lora_" not in k)  # the base is frozen
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    assert len(trainable) == 28 and len(engine.optimizer.state) == 28  # optimizer state for the adapters only


def test_adapters_off_is_the_base_model(tiny_ckpt, batch, nll_loss):
    base = FSDPEngine({"model_path": tiny_ckpt})
    engine = trained(tiny_ckpt, batch, nll_loss)
    want = base.forward(batch)["log_probs"]
    with engine.adapters_off():
        off = engine.forward(batch)["log_probs"]
    torch.testing.assert_close(off, want, atol=1e-6, rtol=0)
    assert float((engine.forward(batch)["log_probs"] - want).abs().max()) > 1e-3  # the adapters do change it


def test_resume_equals_the_uninterrupted_run(tiny_ckpt, batch, nll_loss, tmp_path):
    straight = trained(tiny_ckpt, batch, nll_loss, steps=3)
    first = trained(tiny_ckpt, batch, nll_loss, steps=2)
    first.save_checkpoint(str(tmp_path / "ckpt"))
    resumed = FSDPEngine({"model_path": tiny_ckpt, **LORA})
    resumed.load_checkpoint(str(tmp_path / "ckpt"))
    resumed.train_batch(batch, nll_loss)  # the third step needs the adapters' Adam state back
    for key, value in state(straight).items():
        torch.testing.assert_close(state(resumed)[key], value, atol=1e-6, rtol=1e-6, msg=key)


def test_the_export_loads_in_plain_transformers_and_peft(tiny_ckpt, batch, nll_loss, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hybridflow.workers.rollout.hf import HFRollout

    engine = trained(tiny_ckpt, batch, nll_loss)
    engine.export_hf(str(tmp_path / "hf"))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert not any("lora" in k for k in merged.state_dict())
    from tensordict import TensorDict

    ids = torch.tensor([[0, 0, 51, 45, 52, 63], [121, 106, 99, 118, 34, 57]])
    mask = (ids != 0).long()
    prompts = TensorDict({"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)},
                         batch_size=[2])
    ours = HFRollout(engine.module, engine.tokenizer).generate(prompts, do_sample=False, max_new_tokens=6)
    theirs = HFRollout(merged, engine.tokenizer).generate(prompts, do_sample=False, max_new_tokens=6)
    assert torch.equal(ours["responses"], theirs["responses"])
    torch.testing.assert_close(ours["rollout_log_probs"], theirs["rollout_log_probs"], atol=1e-5, rtol=0)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_ckpt), str(tmp_path / "hf" / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_merged_weights_hold_the_adapters_and_name_the_base_weights(tiny_ckpt, batch, nll_loss):
    from transformers import AutoModelForCausalLM

    engine = trained(tiny_ckpt, batch, nll_loss)
    full = dict(engine.iter_hf_weights())
    base = AutoModelForCausalLM.from_pretrained(tiny_ckpt).state_dict()
    assert set(full) == set(base)  # every weight, under the base model's names
    changed = dict(engine.iter_hf_weights(changed_only=True))
    assert set(changed) == {k for k in base if k.endswith("_proj.weight")}  # only what an update moves
    for key, value in changed.items():
        torch.testing.assert_close(full[key], value)
        assert not torch.equal(value, base[key]), key


def test_a_lora_critic_trains_its_new_value_head(tiny_ckpt, batch):
    engine = FSDPEngine({"model_path": tiny_ckpt, "model_type": "value", **LORA})

    def loss(mb, out):
        return ((out["values"] - 1.0) ** 2 * mb["response_mask"]).mean(), {}

    before = state(engine)
    engine.train_batch(batch, loss)
    after = state(engine)
    head = [k for k in before if ".modules_to_save." in k]
    assert head and all(not torch.equal(before[k], after[k]) for k in head)
    assert all(torch.equal(before[k], after[k]) for k in before if ".lora_" not in k and ".modules_to_save." not in k)


def test_two_lora_ranks_equal_one_rank(tiny_ckpt, make_rl_batch, nll_loss, tmp_path):
    """FSDP2 over 2 gloo ranks with adapters (tests/workers/_dist_worker.py): the same forward and
    update as 1 rank, generate on the sharded adapted module, exact DCP resume, merged export."""
    import json
    import os

    from tensordict import TensorDict
    from transformers import AutoModelForCausalLM

    from tests.gloo_launch import launch

    batch = make_rl_batch([6, 3, 5, 2], [5, 2, 4, 1])
    torch.save(batch, tmp_path / "batch.pt")
    ids = torch.tensor([[0, 0, 51, 45, 52, 63], [121, 106, 99, 118, 34, 57]])
    mask = (ids != 0).long()
    torch.save(TensorDict({"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)},
                          batch_size=[2]), tmp_path / "prompts.pt")
    launch(os.path.join(os.path.dirname(__file__), "_dist_worker.py"), 2, [tiny_ckpt, str(tmp_path), json.dumps(LORA)],
           timeout=240)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))

    single = FSDPEngine({"model_path": tiny_ckpt, **LORA})
    torch.testing.assert_close(torch.cat([r0["forward"], r1["forward"]]), single.forward(batch, temperature=0.7)["log_probs"],
                               atol=1e-5, rtol=0)
    single.train_batch(batch, nll_loss)
    for key, value in state(single).items():
        torch.testing.assert_close(r0["params"][key], value, atol=2e-6, rtol=1e-5, msg=key)
    assert r0["rollout_gap"] < 1e-5 and r1["rollout_gap"] < 1e-5  # sampling on the sharded adapted module
    assert r0["dcp_gap"] == 0.0 and r1["dcp_gap"] == 0.0
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).state_dict()
    assert set(exported) >= set(r0["hf_weights"])
    for key, value in r0["hf_weights"].items():
        torch.testing.assert_close(exported[key], value, atol=1e-6, rtol=0, msg=key)
