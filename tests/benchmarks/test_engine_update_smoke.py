"""Smoke test of benchmarks/engine_update.py (no timing assertions: numbers depend on the machine)."""
import json
import math

import pytest
import torch

from benchmarks.engine_update import main, make_batch


def test_batch_has_the_documented_padding():
    batch = make_batch(rows=32, prompt_length=8, response_length=6, vocab=258)
    am, rm = batch["attention_mask"], batch["response_mask"]
    p_len, r_len = am[:, :8].sum(-1), rm.sum(-1)
    assert p_len.min() >= 4 and p_len.max() <= 8 and r_len.min() >= 1 and r_len.max() <= 6
    assert torch.equal(am[:, 8:], rm) and (batch["input_ids"] * (1 - am)).abs().sum() == 0
    assert (am[:, :8].diff(dim=1) >= 0).all()  # left padding: 0s then 1s


def test_tiny_run_writes_both_variants(tmp_path):
    out = tmp_path / "eu.json"
    report = main(["--config", "benchmarks/configs/tiny.yaml", "--rows", "6", "--micro-batch-size", "3",
                   "--steps", "1", "--peak-tflops", "0.05", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert 0 < report["meta"]["padding_fraction"] < 1
    for name in ("padded", "packed"):
        r = report["variants"][name]
        assert len(r["times_s"]) == 1 and all(math.isfinite(v) and v > 0
                                               for v in (r["update_s"], r["real_tokens_per_s"], r["update_mfu"]))
        assert r["speedup"] > 0
    assert report["variants"]["padded"]["speedup"] == 1.0  # relative to the first variant


def test_variants_and_engine_options_come_from_the_command_line(capsys):
    base = ["--config", "benchmarks/configs/tiny.yaml", "--rows", "6", "--steps", "1", "--peak-tflops", "0.05"]
    report = main(base + ["--variants", "packed", "max_tokens_per_micro_batch=40", "grad_clip=null"])
    assert list(report["variants"]) == ["packed"]
    engine = report["meta"]["engine"]
    assert engine["max_tokens_per_micro_batch"] == 40 and engine["grad_clip"] is None
    with pytest.raises(SystemExit, match="--variants: unknown.*bogus.*available: padded"):
        main(base + ["--variants", "packed,bogus"])
    with pytest.raises(SystemExit):
        main(base + ["oops"])
    assert "oops" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no_such_option"):  # the engine names an unknown option
        main(base + ["no_such_option=1"])


@pytest.mark.lora
def test_lora_variants_report_the_training_state_they_save():
    report = main(["--config", "benchmarks/configs/tiny.yaml", "--rows", "6", "--steps", "1", "--peak-tflops", "0.05",
                   "--variants", "padded,lora8", "--rounds", "2"])
    full, lora = report["variants"]["padded"], report["variants"]["lora8"]
    assert len(full["rounds_s"]) == len(lora["rounds_s"]) == 2
    shape = report["meta"]["shape"]
    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = shape["num_key_value_heads"] * h // shape["num_attention_heads"]
    linear = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down: (in, out)
    assert lora["trainable_params"] == layers * sum(8 * (a + b) for a, b in linear)  # r (in + out) each
    assert full["trainable_params"] == report["meta"]["params"]
    assert full["grads_mb"] == pytest.approx(full["params_mb"])  # full fine-tuning: a gradient for every weight
    assert full["optimizer_state_mb"] == pytest.approx(2 * full["params_mb"])  # AdamW: two moments
    # LoRA: A (r x in) and B (out x r) per linear layer; 4 bytes each, 1 gradient + 2 moments
    assert lora["optimizer_state_mb"] == pytest.approx(2 * lora["trainable_params"] * 4 / 1e6)
    assert lora["params_mb"] > full["params_mb"]  # the adapters come on top of the frozen base
    assert full["peak_rss_gain_gib"] > 0 and lora["peak_rss_gain_gib"] > 0  # measured per variant (Linux)
