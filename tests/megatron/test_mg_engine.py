"""The megatron engine on one rank (this process, real megatron-core on CPU) against the FSDP
engine and transformers: same log-probs/entropy/values for the same weights, same training
steps, generation on the gathered weights, checkpoint and HF export round trips."""
import pytest
import torch
from tensordict import TensorDict

from _mg_common import global_loss, mg_single, nll, rl_batch  # noqa: F401
from hybridflow.trainer.tiny_model import build_tiny_checkpoint

pytestmark = pytest.mark.megatron


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("mg_engine") / "tiny"))


def _engines(path, **kw):
    from hybridflow.workers.engines.fsdp import FSDPEngine
    from hybridflow.workers.engines.megatron import MegatronEngine

    common = dict(model_path=path, lr=1e-2, weight_decay=0.0, micro_batch_size=3, **kw)
    return MegatronEngine(common), FSDPEngine(common)


def test_log_probs_entropy_and_training_match_fsdp(ckpt, mg_single):
    mg, fsdp = _engines(ckpt)
    batch = rl_batch()
    a, b = mg.forward(batch, temperature=0.7, with_entropy=True), fsdp.forward(batch, temperature=0.7,
                                                                              with_entropy=True)
    assert (a["log_probs"] - b["log_probs"]).abs().max() < 1e-5
    assert (a["entropy"] - b["entropy"]).abs().max() < 1e-5
    assert (a["log_probs"] * (1 - batch["response_mask"])).abs().max() == 0  # 0 on padding
    sft = TensorDict({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                      "loss_mask": batch["attention_mask"][:, 1:].float()}, batch_size=[len(batch)])
    # all-token mode; compared where input and target token are both real (a left-pad position
    # predicting the first real token has no defined value: the engines mask padded queries differently)
    both = batch["attention_mask"][:, :-1] * batch["attention_mask"][:, 1:]
    assert ((mg.forward(sft)["log_probs"] - fsdp.forward(sft)["log_probs"]) * both).abs().max() < 1e-5
    traces = []
    for engine in (mg, fsdp):
        trace = []
        for _ in range(3):
            trace.append(global_loss(engine, batch))
            metrics = engine.train_batch(batch, nll, with_entropy=True)
        trace.append(global_loss(engine, batch))
        traces.append((trace, metrics))
    (t_mg, m_mg), (t_fsdp, m_fsdp) = traces
    assert t_mg[-1] < t_mg[0] - 0.5
    assert max(abs(x - y) for x, y in zip(t_mg, t_fsdp)) < 1e-4, (t_mg, t_fsdp)
    assert abs(m_mg["grad_norm"] - m_fsdp["grad_norm"]) < 1e-3 * m_fsdp["grad_norm"]
    assert m_mg["lr"] == pytest.approx(1e-2) and "loss" in m_mg


def test_value_model_trains_and_exports(ckpt, mg_single, tmp_path):
    from hybridflow.workers.engines.fsdp import FSDPEngine
    from hybridflow.workers.engines.megatron import MegatronEngine

    engine = MegatronEngine(model_path=ckpt, model_type="value", lr=1e-3, micro_batch_size=3)
    batch = rl_batch()
    values = engine.forward(batch)["values"]
    assert values.shape == batch["responses"].shape and values.abs().sum() > 0

    def value_loss(mb, out):
        m = mb["response_mask"]
        loss = ((out["values"] - 1.0) ** 2 * m).sum() / m.sum()
        return loss, {"vf": loss.detach()}

    first = engine.train_batch(batch, value_loss)["vf"]
    for _ in range(3):
        last = engine.train_batch(batch, value_loss)["vf"]
    assert last < first * 0.5
    engine.export_hf(str(tmp_path / "value"))
    reloaded = FSDPEngine(model_path=str(tmp_path / "value"), model_type="value", lr=0.0)
    assert (reloaded.forward(batch)["values"] - engine.forward(batch)["values"]).abs().max() < 1e-5


def test_generation_on_gathered_weights(ckpt, mg_single):
    from hybridflow.workers.engines.megatron import MegatronEngine
    from hybridflow.workers.rollout.hf import HFRollout

    engine = MegatronEngine(model_path=ckpt, lr=1e-2, micro_batch_size=4)
    batch = rl_batch()
    engine.train_batch(batch, nll, with_entropy=True)  # generation must see the trained weights
    rollout = HFRollout(engine.module, engine.tokenizer, engine.device)
    prompts = TensorDict({"input_ids": batch["prompts"][:3], "attention_mask": batch["attention_mask"][:3, :6]},
                         batch_size=[3])
    with engine.generation_context() as module:
        assert module is engine.module
        state = engine.generation_state_dict()
        assert all(torch.equal(p, state[n]) for n, p in module.named_parameters())
        out = rollout.generate(prompts, n=2, temperature=0.8, max_new_tokens=5, seed=3)
    assert sum(p.numel() for p in engine.module.parameters()) == 0  # released after generation
    recomputed = engine.forward(out, temperature=0.8)["log_probs"]
    assert (recomputed - out["rollout_log_probs"]).abs().max() < 1e-5


def test_checkpoint_and_export_round_trip(ckpt, mg_single, tmp_path):
    from transformers import AutoModelForCausalLM

    from hybridflow.workers.convert import load_hf_state_dict
    from hybridflow.workers.engines.megatron import MegatronEngine

    engine = MegatronEngine(model_path=ckpt, lr=1e-2, micro_batch_size=4)
    engine.export_hf(str(tmp_path / "hf0"))
    original, exported = load_hf_state_dict(ckpt), load_hf_state_dict(str(tmp_path / "hf0"))
    assert sorted(original) == sorted(exported) and all(torch.equal(original[k], exported[k]) for k in original)
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf0")) is not None
    batch = rl_batch()
    engine.train_batch(batch, nll, with_entropy=True)
    engine.save_checkpoint(str(tmp_path / "ckpt"))
    engine.train_batch(batch, nll, with_entropy=True)
    after = engine.generation_state_dict()
    engine.load_checkpoint(str(tmp_path / "ckpt"))
    assert engine.global_step == 1
    engine.train_batch(batch, nll, with_entropy=True)
    again = engine.generation_state_dict()
    assert all(torch.equal(after[k], again[k]) for k in after)


def test_build_engine_and_errors(ckpt, mg_single):
    from hybridflow.workers.engines.megatron import MegatronEngine
    from hybridflow.workers.roles.common import build_engine, dispatch_position

    ref = build_engine(ckpt, {"backend": "megatron", "megatron": {"tp": 1, "pp": 1}, "lr": 1.0}, trainable=False)
    assert isinstance(ref, MegatronEngine) and ref.optimizer is None
    assert dispatch_position(ref, 0, 1) == (0, 1, True)
    with pytest.raises(RuntimeError, match="frozen"):
        ref.train_batch(rl_batch(), nll)
    with pytest.raises(ValueError, match="unknown key"):
        build_engine(ckpt, {"backend": "megatron", "megatron": {"tensor_parallel": 2}})
    with pytest.raises(ValueError, match="not divisible by tp"):
        build_engine(ckpt, {"backend": "megatron", "megatron": {"tp": 2}})
    with pytest.raises(ValueError, match="reshard must be one of .*'smart'"):
        build_engine(ckpt, {"backend": "megatron", "megatron": {"reshard": "smart"}})
    with pytest.raises(ValueError, match="remove_padding=true is not supported"):
        build_engine(ckpt, {"backend": "megatron", "remove_padding": True})
    with pytest.raises(ValueError, match="compile=true is not supported"):
        build_engine(ckpt, {"backend": "megatron", "compile": True})


def test_bf16_trains_and_restores_master_weights(ckpt, mg_single, tmp_path):
    from hybridflow.workers.engines.megatron import MegatronEngine, _main_params

    engine = MegatronEngine(model_path=ckpt, lr=1e-2, dtype="bf16", micro_batch_size=4)
    batch = rl_batch()
    before = global_loss(engine, batch)
    for _ in range(3):
        engine.train_batch(batch, nll, with_entropy=True)
    assert global_loss(engine, batch) < before - 0.5

    def masters():
        return [p.clone() for opt in engine.optimizer.chained_optimizers for p in _main_params(opt)]

    engine.save_checkpoint(str(tmp_path / "bf16"))
    engine.train_batch(batch, nll, with_entropy=True)
    after = masters()
    assert after, "bf16 parameters have fp32 master copies"
    engine.load_checkpoint(str(tmp_path / "bf16"))
    engine.train_batch(batch, nll, with_entropy=True)
    assert all(torch.equal(a, b) for a, b in zip(after, masters()))
