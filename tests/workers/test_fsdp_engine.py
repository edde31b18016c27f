"""FSDPEngine on one rank (gloo, CPU): numerics against plain transformers + torch."""
import json
import os

import pytest
import torch
from tensordict import TensorDict

from hybridflow.workers.engines.fsdp import FSDPEngine

# eps=1 makes Adam's first step ~ lr * g (not lr * sign(g)), so gradient errors show in the params
SGD_LIKE = {"lr": 1.0, "eps": 1.0, "weight_decay": 0.0, "grad_clip": None}


def full_params(engine):
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in engine.module.state_dict().items()}


def assert_params_close(a, b, atol=2e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


def hf_response_log_probs(model, batch, temperature=1.0):
    R = batch["responses"].shape[1]
    P = batch["input_ids"].shape[1] - R
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits[:, P - 1:P + R - 1] / temperature
    lp = torch.log_softmax(logits, -1).gather(-1, batch["responses"][..., None]).squeeze(-1)
    return lp, torch.distributions.Categorical(logits=logits).entropy()


@pytest.fixture(scope="module")
def hf_model(tiny_ckpt):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_ckpt).eval()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_log_probs_and_entropy_match_transformers(tiny_ckpt, hf_model, make_rl_batch, temperature):
    batch = make_rl_batch([6, 3, 5, 2, 4], [5, 2, 4, 1, 5])
    engine = FSDPEngine({"model_path": tiny_ckpt, "forward_micro_batch_size": 2})
    out = engine.forward(batch, temperature=temperature, with_entropy=True)
    assert out["log_probs"].shape == out["entropy"].shape == (5, 5)
    with torch.no_grad():
        ref_lp, ref_ent = hf_response_log_probs(hf_model, batch, temperature)
    mask = batch["response_mask"]
    torch.testing.assert_close(out["log_probs"], ref_lp * mask, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["entropy"], ref_ent * mask, atol=1e-5, rtol=1e-5)
    # token-budget micro-batching (rows regrouped and trimmed) returns rows in the input order
    engine.config.forward_max_tokens_per_micro_batch = 9
    torch.testing.assert_close(engine.forward(batch, temperature=temperature)["log_probs"], out["log_probs"])


def test_all_token_mode_for_sft(tiny_ckpt, hf_model, nll_loss):
    ids = torch.randint(2, 258, (3, 9), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    am[1, 6:] = 0  # right padding, as SFT data usually is
    ids[1, 6:] = 0
    batch = TensorDict({"input_ids": ids, "attention_mask": am, "loss_mask": am[:, 1:].float()}, batch_size=[3])
    engine = FSDPEngine({"model_path": tiny_ckpt})
    out = engine.forward(batch)
    assert out["log_probs"].shape == (3, 8)
    with torch.no_grad():
        logits = hf_model(input_ids=ids, attention_mask=am).logits[:, :-1]
    ref = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * am[:, 1:]
    torch.testing.assert_close(out["log_probs"], ref, atol=1e-5, rtol=1e-5)

    # SFT step: token-weighted by loss_mask, so micro-batching does not change it (omegaconf config)
    from omegaconf import OmegaConf

    batch["loss_mask"][0, :4] = 0  # e.g. prompt tokens are not trained on
    params = []
    for rows in (None, 1):
        engine = FSDPEngine(OmegaConf.create({"model_path": tiny_ckpt, **SGD_LIKE, "micro_batch_size": rows}))
        engine.train_batch(batch, nll_loss)
        params.append(full_params(engine))
    assert_params_close(params[1], params[0])


def test_train_step_equals_reference_step_with_clipping(tiny_ckpt, make_rl_batch, nll_loss):
    from transformers import AutoModelForCausalLM

    batch = make_rl_batch([6, 3, 5, 2], [5, 2, 4, 1])
    engine = FSDPEngine({"model_path": tiny_ckpt, **SGD_LIKE, "lr": 0.5, "grad_clip": 0.3})
    metrics = engine.train_batch(batch, nll_loss)

    ref = AutoModelForCausalLM.from_pretrained(tiny_ckpt)
    lp, _ = hf_response_log_probs(ref, batch)
    loss = -(lp * batch["response_mask"]).sum() / batch["response_mask"].sum()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.3)
    torch.optim.AdamW(ref.parameters(), lr=0.5, eps=1.0, weight_decay=0.0).step()

    assert norm > 0.3  # clipping was active
    assert metrics["grad_norm"] == pytest.approx(float(norm), rel=1e-5)
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert metrics["lr"] == 0.5 and engine.global_step == 1
    assert_params_close(full_params(engine), {k: v.detach() for k, v in ref.state_dict().items()})


def test_micro_batching_and_checkpointing_give_the_same_update(tiny_ckpt, make_rl_batch, nll_loss):
    batch = make_rl_batch([6, 3, 5, 2], [5, 2, 4, 1])  # 11, 5, 9, 3 real tokens
    results = []
    for extra in ({}, {"micro_batch_size": 1}, {"max_tokens_per_micro_batch": 11},
                  {"micro_batch_size": 2, "gradient_checkpointing": True}):
        engine = FSDPEngine({"model_path": tiny_ckpt, **SGD_LIKE, **extra})
        metrics = engine.train_batch(batch, nll_loss)
        results.append((full_params(engine), metrics))
    base_params, base_metrics = results[0]
    for params, metrics in results[1:]:
        assert_params_close(params, base_params)
        assert metrics["loss"] == pytest.approx(base_metrics["loss"], rel=1e-5)  # token-weighted mean
        assert metrics["grad_norm"] == pytest.approx(base_metrics["grad_norm"], rel=1e-5)


def test_lr_warmup_and_decay_reported_per_step(tiny_ckpt, make_rl_batch, nll_loss):
    batch = make_rl_batch([3, 3], [2, 2], P=3, R=2)
    engine = FSDPEngine({"model_path": tiny_ckpt, "lr": 1e-3, "warmup_steps": 2, "total_steps": 4,
                         "lr_schedule": "linear"})
    lrs = [engine.train_batch(batch, nll_loss)["lr"] for _ in range(4)]
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])
    assert engine.lr == pytest.approx(0.0)


def test_dcp_round_trip_and_hf_export(tiny_ckpt, make_rl_batch, nll_loss, tmp_path):
    from transformers import AutoModelForCausalLM

    batch = make_rl_batch([6, 3, 5], [5, 2, 4], seed=3)
    cfg = {"model_path": tiny_ckpt, "lr": 1e-2, "warmup_steps": 1, "total_steps": 6, "lr_schedule": "cosine",
           "micro_batch_size": 2}
    first = FSDPEngine(cfg)
    first.train_batch(batch, nll_loss)
    first.save_checkpoint(str(tmp_path / "ckpt"))
    expected = first.train_batch(batch, nll_loss)

    second = FSDPEngine(cfg)
    before = full_params(second)
    second.load_checkpoint(str(tmp_path / "ckpt"))
    assert second.global_step == 1 and second.lr == pytest.approx(expected["lr"])
    assert any(not torch.equal(before[k], v) for k, v in full_params(second).items())
    got = second.train_batch(batch, nll_loss)  # Adam moments + step restored => identical step
    assert got == pytest.approx(expected)
    assert_params_close(full_params(second), full_params(first), atol=0)

    first.export_hf(str(tmp_path / "hf"))
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["architectures"] == ["Qwen2ForCausalLM"]
    assert os.path.isfile(tmp_path / "hf" / "tokenizer.json")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    with torch.no_grad():
        ids = batch["input_ids"]
        torch.testing.assert_close(reloaded(input_ids=ids).logits, first.module(input_ids=ids).logits, atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="no DCP checkpoint"):
        second.load_checkpoint(str(tmp_path / "missing"))


def test_value_model_positions_and_training(tiny_ckpt, make_rl_batch, tmp_path):
    batch = make_rl_batch([6, 3, 5, 2], [5, 2, 4, 1])
    engine = FSDPEngine({"model_path": tiny_ckpt, "model_type": "value", "lr": 3e-3, "weight_decay": 0.0,
                         "micro_batch_size": 2})
    values = engine.forward(batch)["values"]
    assert values.shape == (4, 5)
    assert torch.all(values[batch["response_mask"] == 0] == 0)
    # convention: values[:, t] is the head at position P-1+t (state before response token t)
    every = engine.forward(batch.exclude("responses", "response_mask"))["values"]
    assert every.shape == (4, 11)
    torch.testing.assert_close(values, every[:, 5:10] * batch["response_mask"], atol=1e-5, rtol=1e-5)

    target = torch.linspace(-1, 1, 5).expand(4, 5)

    def mse(mb, out):
        mask = mb["response_mask"]
        loss = (((out["values"] - target[:mb.batch_size[0]].to(out["values"])) ** 2) * mask).sum() / mask.sum()
        return loss, {"vf_loss": loss.detach()}

    losses = [engine.train_batch(batch, mse)["vf_loss"] for _ in range(10)]
    assert losses[-1] < 0.3 * losses[0]
    # the same head comes out of a fresh engine with the same seed (identical on every rank)
    again = FSDPEngine({"model_path": tiny_ckpt, "model_type": "value"})
    torch.testing.assert_close(again.forward(batch)["values"], values)
    # a trained critic exports as a plain token-classification checkpoint
    from transformers import AutoModelForTokenClassification

    engine.export_hf(str(tmp_path / "critic"))
    critic = AutoModelForTokenClassification.from_pretrained(str(tmp_path / "critic")).eval()
    with torch.no_grad():
        ref = critic(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"]).logits.squeeze(-1)
    torch.testing.assert_close(engine.forward(batch)["values"], ref[:, 5:10] * batch["response_mask"],
                               atol=1e-5, rtol=1e-5)


def test_non_finite_gradient_skips_the_step(tiny_ckpt, make_rl_batch):
    batch = make_rl_batch([3, 3], [2, 2], P=3, R=2)
    engine = FSDPEngine({"model_path": tiny_ckpt, "lr": 0.1})
    before = full_params(engine)

    def bad(mb, out):
        return out["log_probs"].sum() * float("nan"), {}

    metrics = engine.train_batch(batch, bad)
    assert metrics["grad_norm"] != metrics["grad_norm"]  # NaN reported
    assert_params_close(full_params(engine), before, atol=0)
    assert engine.global_step == 1


def test_config_errors_name_the_cause(tiny_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        FSDPEngine({"model_path": str(tmp_path / "no_such_dir")})
    with pytest.raises(ValueError, match="learning_rate"):
        FSDPEngine({"model_path": tiny_ckpt, "learning_rate": 1.0})
    with pytest.raises(ValueError, match="total_steps"):
        FSDPEngine({"model_path": tiny_ckpt, "lr_schedule": "cosine"})
    with pytest.raises(ValueError, match="model_path is required"):
        FSDPEngine({})
    engine = FSDPEngine({"model_path": tiny_ckpt})
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="loss_mask must be"):
        engine.forward(TensorDict({"input_ids": ids, "attention_mask": ids, "loss_mask": ids}, batch_size=[2]))


# ---------------------------------------------------------------- remove_padding (packed tokens)
def tokens_seen(engine):
    """Record the input shapes the decoder's embedding sees (proves no padding is computed)."""
    shapes = []
    engine.module.get_input_embeddings().register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    return shapes


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_packed_forward_equals_padded(tiny_ckpt, make_rl_batch, temperature):
    batch = make_rl_batch([6, 3, 5, 1, 4], [5, 2, 4, 1, 5])  # includes a length-1 prompt and response
    padded = FSDPEngine({"model_path": tiny_ckpt, "forward_micro_batch_size": 2})
    packed = FSDPEngine({"model_path": tiny_ckpt, "forward_micro_batch_size": 2, "remove_padding": True})
    shapes = tokens_seen(packed)
    ref = padded.forward(batch, temperature=temperature, with_entropy=True)
    out = packed.forward(batch, temperature=temperature, with_entropy=True)
    for key in ("log_probs", "entropy"):
        torch.testing.assert_close(out[key], ref[key], atol=1e-5, rtol=1e-5)
    assert out["log_probs"].abs().sum() > 0
    real = batch["attention_mask"].sum(-1).tolist()
    assert shapes == [(1, real[0] + real[1]), (1, real[2] + real[3]), (1, real[4])]  # one row, no pads


def test_packed_forward_with_flex_attention_keeps_sequences_apart(tiny_ckpt, make_rl_batch):
    """flex_attention (the GPU's variable-length path without flash-attn) builds its document mask
    from the restarting position ids: the packed forward equals the padded one, so no token sees
    another sequence. Forward only: torch's flex attention has no backward on CPU (the update is
    checked on a GPU by tests/workers/test_gpu_paths.py)."""
    batch = make_rl_batch([6, 3, 5], [5, 2, 4])
    ref = FSDPEngine({"model_path": tiny_ckpt}).forward(batch)["log_probs"]
    flex = FSDPEngine({"model_path": tiny_ckpt, "remove_padding": True, "attn_implementation": "flex_attention"})
    assert flex.module.config._attn_implementation == "flex_attention"
    torch.testing.assert_close(flex.forward(batch)["log_probs"], ref, atol=1e-5, rtol=1e-5)


def test_compiled_layers_give_the_eager_update(tiny_ckpt, make_rl_batch, nll_loss):
    """compile=True: each decoder layer's forward runs through torch.compile (FSDP2's hooks
    outside it), padded and packed; the update equals the eager one and the names are unchanged."""
    batch = make_rl_batch([6, 3, 5, 2], [5, 2, 4, 1])
    eager = FSDPEngine({"model_path": tiny_ckpt, **SGD_LIKE})
    ref_metrics, ref_params = eager.train_batch(batch, nll_loss), full_params(eager)
    for extra in ({}, {"remove_padding": True}):
        engine = FSDPEngine({"model_path": tiny_ckpt, **SGD_LIKE, "compile": True, **extra})
        layers = [m for m in engine.module.modules() if hasattr(m, "self_attn")]
        assert layers and all(hasattr(m.forward, "_torchdynamo_orig_callable") for m in layers)
        metrics = engine.train_batch(batch, nll_loss)
        assert full_params(engine).keys() == ref_params.keys()
        assert_params_close(full_params(engine), ref_params, atol=5e-6)
        assert metrics["loss"] == pytest.approx(ref_metrics["loss"], rel=1e-5)


def test_packed_value_model_and_all_token_mode(tiny_ckpt, make_rl_batch):
    batch = make_rl_batch([6, 3, 5], [5, 2, 1])
    for model_type in ("value", "causal_lm"):
        ref = FSDPEngine({"model_path": tiny_ckpt, "model_type": model_type}).forward(batch)
        out = FSDPEngine({"model_path": tiny_ckpt, "model_type": model_type, "remove_padding": True}).forward(batch)
        key = "values" if model_type == "value" else "log_probs"
        torch.testing.assert_close(out[key], ref[key], atol=1e-5, rtol=1e-5)
    # all-token (SFT) mode with right padding
    ids = torch.randint(2, 258, (3, 9), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    am[1, 6:] = 0
    ids[1, 6:] = 0
    sft = TensorDict({"input_ids": ids, "attention_mask": am}, batch_size=[3])
    ref = FSDPEngine({"model_path": tiny_ckpt}).forward(sft)["log_probs"]
    out = FSDPEngine({"model_path": tiny_ckpt, "remove_padding": True}).forward(sft)["log_probs"]
    assert out.shape == (3, 8)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_packed_train_step_equals_padded(tiny_ckpt, make_rl_batch, nll_loss):
    batch = make_rl_batch([6, 3, 5, 2], [5, 2, 4, 1])
    results = []
    for extra in ({}, {"remove_padding": True}, {"remove_padding": True, "max_tokens_per_micro_batch": 11}):
        engine = FSDPEngine({"model_path": tiny_ckpt, **SGD_LIKE, **extra})
        metrics = engine.train_batch(batch, nll_loss)
        results.append((full_params(engine), metrics))
    for params, metrics in results[1:]:
        assert_params_close(params, results[0][0], atol=5e-6)
        assert metrics["loss"] == pytest.approx(results[0][1]["loss"], rel=1e-5)
        assert metrics["grad_norm"] == pytest.approx(results[0][1]["grad_norm"], rel=1e-5)


def test_one_rank_keeps_the_plain_module_with_the_same_numerics(tiny_ckpt, make_rl_batch, nll_loss, tmp_path):
    """One fp32 rank keeps the HF module unwrapped (shard_single_rank=False): the same forward, the
    same update as the FSDP2-wrapped engine, and DCP checkpoints load across the two forms."""
    from torch.distributed.fsdp import FSDPModule

    plain = FSDPEngine({"model_path": tiny_ckpt, **SGD_LIKE})
    wrapped = FSDPEngine({"model_path": tiny_ckpt, **SGD_LIKE, "shard_single_rank": True})
    assert not plain.sharded and not isinstance(plain.module, FSDPModule)
    assert wrapped.sharded and isinstance(wrapped.module, FSDPModule)
    batch = make_rl_batch([6, 3, 5, 2], [5, 2, 4, 1])
    torch.testing.assert_close(plain.forward(batch)["log_probs"], wrapped.forward(batch)["log_probs"], atol=1e-6, rtol=0)
    for _ in range(2):
        a, b = plain.train_batch(batch, nll_loss), wrapped.train_batch(batch, nll_loss)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert_params_close(full_params(plain), full_params(wrapped))
    plain.save_checkpoint(str(tmp_path / "plain"))
    fresh = FSDPEngine({"model_path": tiny_ckpt, **SGD_LIKE, "shard_single_rank": True})
    fresh.load_checkpoint(str(tmp_path / "plain"))  # a plain checkpoint into an FSDP2 engine ...
    assert_params_close(full_params(fresh), full_params(plain))
    wrapped.save_checkpoint(str(tmp_path / "wrapped"))
    back = FSDPEngine({"model_path": tiny_ckpt, **SGD_LIKE})
    back.load_checkpoint(str(tmp_path / "wrapped"))  # ... and the other way
    assert_params_close(full_params(back), full_params(wrapped))
    assert back.train_batch(batch, nll_loss)["grad_norm"] == pytest.approx(
        wrapped.train_batch(batch, nll_loss)["grad_norm"], rel=1e-5)  # the optimizer state came along
