"""GPU-only checks of the fast training paths that the CPU suite cannot run (torch's flex attention
has no backward on CPU). Skipped without CUDA; on a GPU machine ``bash benchmarks/gpu_suite.sh
check`` runs them with the CUDA-graph rollout test.

* fp32: every variant of benchmarks/engine_update.py (packed with sdpa, packed with flex
  attention's document mask, compiled decoder layers) gives the padded path's log-probs before
  and after one update, and the same grad norm.
* bf16 (the GPU default): the packed flex update trains (finite loss, the trained tokens' log-probs go up).
"""
import pytest
import torch

from benchmarks.engine_update import VARIANTS, make_batch, nll
from hybridflow.workers.engines.fsdp import FSDPEngine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _batch(engine):
    return make_batch(rows=12, prompt_length=24, response_length=16, vocab=engine.module.config.vocab_size, seed=1)


def _update(ckpt, extra, dtype):
    engine = FSDPEngine({"model_path": ckpt, "micro_batch_size": 4, "lr": 1e-3, "dtype": dtype, **extra})
    batch = _batch(engine)
    before = engine.forward(batch)["log_probs"]
    metrics = engine.train_batch(batch, nll)
    return batch, before, engine.forward(batch)["log_probs"], metrics


def test_update_variants_match_the_padded_one_in_fp32(tiny_ckpt):
    results = {name: _update(tiny_ckpt, extra, "float32") for name, extra in VARIANTS.items()}
    batch, ref_before, ref_after, ref_metrics = results["padded"]
    mask = batch["response_mask"].bool()
    for name, (_, before, after, metrics) in results.items():
        torch.testing.assert_close(before[mask], ref_before[mask], atol=1e-4, rtol=0, msg=name)
        torch.testing.assert_close(after[mask], ref_after[mask], atol=1e-4, rtol=0, msg=name)
        assert metrics["grad_norm"] == pytest.approx(ref_metrics["grad_norm"], rel=1e-3), name
    assert (ref_after - ref_before)[mask].mean() > 1e-3  # the update moved the trained tokens


def test_packed_flex_update_trains_in_bf16(tiny_ckpt):
    batch, before, after, metrics = _update(tiny_ckpt, VARIANTS["packed_flex"], "bfloat16")
    mask = batch["response_mask"].bool()
    assert torch.isfinite(torch.tensor(metrics["loss"])) and metrics["grad_norm"] > 0
    assert (after - before)[mask].mean() > 1e-3
