"""FSDP2 over 2 gloo ranks (2 processes) equals 1 rank on the whole batch.

Rank 0 gets rows [0, 1, 2], rank 1 row [3]: different row and token counts, so the test also
covers the global token normalisation of train_batch and the zero-weight dummy micro-batches
that keep the FSDP collectives aligned (token budget 11 gives rank 0 three micro-batches).
"""
import os

import torch
from tensordict import TensorDict

from hybridflow.workers.engines.fsdp import FSDPEngine
from tests.gloo_launch import launch

WORKER = os.path.join(os.path.dirname(__file__), "_dist_worker.py")


def test_two_ranks_equal_one_rank(tiny_ckpt, make_rl_batch, nll_loss, tmp_path):
    batch = make_rl_batch([6, 3, 5, 2], [5, 2, 4, 1])
    torch.save(batch, tmp_path / "batch.pt")
    enc_ids = torch.tensor([[0, 0, 51, 45, 52, 63], [121, 106, 99, 118, 34, 57]])
    am = (enc_ids != 0).long()
    torch.save(TensorDict({"input_ids": enc_ids, "attention_mask": am,
                           "position_ids": (am.cumsum(-1) - 1).clamp(min=0)}, batch_size=[2]),
               tmp_path / "prompts.pt")
    launch(WORKER, 2, [tiny_ckpt, str(tmp_path)], timeout=240)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["world"] == r1["world"] == 2

    single = FSDPEngine({"model_path": tiny_ckpt, "lr": 1.0, "eps": 1.0, "weight_decay": 0.0, "grad_clip": None})
    fwd = single.forward(batch, temperature=0.7)["log_probs"]
    torch.testing.assert_close(torch.cat([r0["forward"], r1["forward"]]), fwd, atol=1e-5, rtol=0)
    metrics = single.train_batch(batch, nll_loss)
    params = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in single.module.state_dict().items()}
    moved = 0.0
    for k, v in params.items():
        torch.testing.assert_close(r0["params"][k], v, atol=2e-6, rtol=1e-5, msg=k)
        torch.testing.assert_close(r1["params"][k], v, atol=2e-6, rtol=1e-5, msg=k)
        moved = max(moved, float((r0["params"][k] - r0["final_params"][k]).abs().max()))
    assert abs(r0["metrics"]["grad_norm"] - metrics["grad_norm"]) < 1e-5 * metrics["grad_norm"]

    # generate under FSDP2 with synced_gpus: rank 1 finished after 1 token while rank 0 went on
    assert r1["early_mask"].tolist() == [[1, 0, 0, 0, 0, 0]]
    assert r0["early_mask"].sum() == 6
    assert r0["rollout_gap"] < 1e-5 and r1["rollout_gap"] < 1e-5

    # DCP over 2 ranks restores the exact training state; export_hf holds the full weights
    assert r0["dcp_gap"] == 0.0 and r1["dcp_gap"] == 0.0 and moved > 0
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).state_dict()
    for k, v in r0["final_params"].items():
        torch.testing.assert_close(exported[k], v, atol=0, rtol=0, msg=k)
