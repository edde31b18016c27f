"""Hand-computed metric values on a tiny batch (B=2, P=3, R=4)."""
import math
import time

import numpy as np
import pytest
import torch

from hybridflow.protocol import DataProto
from hybridflow.trainer.metrics import Timer, compute_data_metrics, compute_throughput, reduce_metrics


def _batch(**drop):
    # row 0: prompt of 2 real tokens, response of 2 tokens; row 1: prompt 3, response 4 (clipped).
    prompts = torch.tensor([[0, 5, 6], [7, 8, 9]])
    responses = torch.tensor([[1, 2, 0, 0], [3, 4, 5, 6]])
    response_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    attention = torch.cat([torch.tensor([[0, 1, 1], [1, 1, 1]]), response_mask], dim=1)
    cols = dict(
        prompts=prompts, responses=responses, input_ids=torch.cat([prompts, responses], 1),
        attention_mask=attention, response_mask=response_mask.float(),
        token_level_scores=torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.5]]),
        token_level_rewards=torch.tensor([[0.0, 0.8, 0.0, 0.0], [0.0, 0.0, 0.0, 0.3]]),
        advantages=torch.tensor([[1.0, 2.0, 99.0, 99.0], [-1.0, 0.0, 3.0, 4.0]]),
        returns=torch.tensor([[1.0, 1.0, 50.0, 50.0], [2.0, 2.0, 2.0, 2.0]]),
        values=torch.tensor([[0.5, 0.5, 9.0, 9.0], [1.0, 1.0, 1.0, 1.0]]),
        old_log_probs=torch.tensor([[-1.0, -1.0, 0.0, 0.0], [-2.0, -2.0, -2.0, -2.0]]),
        ref_log_probs=torch.tensor([[-1.5, -1.0, 7.0, 7.0], [-2.0, -2.5, -2.0, -2.0]]),
    )
    for key in drop:
        cols.pop(key)
    return DataProto.from_dict(cols)


def test_data_metrics_hand_computed():
    m = compute_data_metrics(_batch())
    expected = {
        "reward/mean": 0.75, "reward/max": 1.0, "reward/min": 0.5, "reward/rewards_mean": 0.55,
        "response_length/mean": 3.0, "response_length/max": 4.0, "response_length/min": 2.0,
        "response_length/clip_ratio": 0.5, "prompt_length/mean": 2.5,
        # masked tokens: [1, 2] and [-1, 0, 3, 4] -> mean 9/6, padding (99) ignored
        "advantages/mean": 1.5, "advantages/max": 4.0, "advantages/min": -1.0,
        "returns/mean": 10.0 / 6, "values/mean": 5.0 / 6,
        # old - ref on masked tokens: 0.5, 0, 0, 0.5, 0, 0 -> 1/6
        "actor/kl_ref": 1.0 / 6,
    }
    assert set(m) == set(expected)
    for key, value in expected.items():
        assert m[key] == pytest.approx(value), key


def test_missing_columns_are_absent():
    m = compute_data_metrics(_batch(ref_log_probs=1, values=1, returns=1, token_level_rewards=1))
    assert "actor/kl_ref" not in m and "values/mean" not in m and "returns/mean" not in m
    assert "reward/rewards_mean" not in m and m["reward/mean"] == pytest.approx(0.75)
    only_scores = DataProto.from_dict({"token_level_scores": torch.ones(3, 2)})
    assert compute_data_metrics(only_scores) == {"reward/mean": 2.0, "reward/max": 2.0, "reward/min": 2.0}


def test_response_mask_falls_back_to_attention_mask():
    m = compute_data_metrics(_batch(response_mask=1))
    assert m["response_length/mean"] == 3.0 and m["advantages/mean"] == pytest.approx(1.5)


def test_throughput():
    t = compute_throughput(_batch(), step_time_s=2.0, num_devices=2)
    assert t["throughput/total_tokens"] == 11  # (2 + 2) + (3 + 4)
    assert t["throughput/tokens_per_s"] == pytest.approx(11 / 2 / 2)
    with pytest.raises(ValueError, match="step_time_s"):
        compute_throughput(_batch(), 0.0, 1)
    with pytest.raises(ValueError, match="num_devices"):
        compute_throughput(_batch(), 1.0, 0)


def test_timer_accumulates_and_resets():
    timer = Timer()
    with timer("step"):
        for _ in range(2):
            with timer("gen"):
                time.sleep(0.01)
    m = timer.step_metrics()
    assert set(m) == {"timing/gen_s", "timing/step_s"}
    assert m["timing/gen_s"] >= 0.02 and m["timing/step_s"] >= m["timing/gen_s"]
    assert timer.step_metrics() == {}
    with pytest.raises(ValueError):
        with timer("a/b"):
            pass


def test_timer_records_on_exception():
    timer = Timer()
    with pytest.raises(RuntimeError):
        with timer("update"):
            raise RuntimeError("boom")
    assert "timing/update_s" in timer.step_metrics()


def test_reduce_metrics():
    out = reduce_metrics({"a": [1.0, 2.0, 6.0], "b": 3, "c": torch.tensor(0.5), "d": np.array([1.0, 3.0]),
                          "e": [], "f": [1.0, float("nan")], "g": torch.tensor([2.0, 4.0])})
    assert out["a"] == 3.0 and out["b"] == 3.0 and out["c"] == 0.5 and out["d"] == 2.0 and out["g"] == 3.0
    assert "e" not in out and math.isnan(out["f"])
    assert all(type(v) is float for v in out.values())
    with pytest.raises(TypeError, match="'x'"):
        reduce_metrics({"x": "text"})
