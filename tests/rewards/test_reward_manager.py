"""RewardManager: per-sample and batch functions, extras, fallback, strict mode; token placement."""
import logging
import math

import numpy as np
import pytest
import torch

from hybridflow.trainer.rewards import RewardError, RewardManager, batch_reward, scores_to_token_level

PROMPTS = ["1+1=", "2+2=", "3+3="]
RESPONSES = ["2", "5", "6"]
TRUTHS = ["2", "4", "6"]


def exact(prompt, response, ground_truth, **extra):
    return float(response == ground_truth)


def test_per_sample_scores_and_dtype():
    scores, metrics = RewardManager(exact)(PROMPTS, RESPONSES, TRUTHS, {})
    assert scores.dtype == np.float32 and scores.tolist() == [1.0, 0.0, 1.0]
    assert metrics == {"reward/num_failed": 0.0}


def test_extras_are_passed_per_sample():
    seen = []

    def fn(prompt, response, ground_truth, **extra):
        seen.append(extra)
        return 1.0

    extras = {"data_source": ["a", "b", "c"], "extra_info": [{"i": 0}, {"i": 1}, {"i": 2}]}
    RewardManager(fn)(PROMPTS, RESPONSES, TRUTHS, extras)
    assert seen[1] == {"data_source": "b", "extra_info": {"i": 1}}


def test_function_without_var_kwargs_gets_only_the_extras_it_names():
    def fn(prompt, response, ground_truth, data_source):
        return 1.0 if data_source == "keep" else 0.0

    scores, _ = RewardManager(fn)(PROMPTS, RESPONSES, TRUTHS, {"data_source": ["keep", "x", "keep"],
                                                                "extra_info": [{}, {}, {}]})
    assert scores.tolist() == [1.0, 0.0, 1.0]


def test_dict_results_give_extra_metrics():
    def fn(prompt, response, ground_truth, **extra):
        out = {"score": float(response == ground_truth), "format": 1.0, "note": "text is ignored"}
        if prompt != "3+3=":
            out["length"] = len(response)
        return out

    scores, metrics = RewardManager(fn)(PROMPTS, ["2", "55", "6"], TRUTHS, {})
    assert scores.tolist() == [1.0, 0.0, 1.0]
    assert metrics == {"reward/num_failed": 0.0, "reward/format/mean": 1.0, "reward/length/mean": 1.5}


def test_batch_variant_is_called_once_with_lists():
    calls = []

    @batch_reward
    def fn(prompts, responses, ground_truths, **extra_lists):
        calls.append((prompts, extra_lists))
        return [{"score": float(r == g), "bonus": 2.0} for r, g in zip(responses, ground_truths)]

    scores, metrics = RewardManager(fn)(PROMPTS, RESPONSES, TRUTHS, {"data_source": ["a", "b", "c"]})
    assert scores.tolist() == [1.0, 0.0, 1.0] and metrics["reward/bonus/mean"] == 2.0
    assert calls == [(PROMPTS, {"data_source": ["a", "b", "c"]})]


def test_batch_variant_wrong_length_is_an_error():
    @batch_reward
    def fn(prompts, responses, ground_truths, **extra_lists):
        return [1.0]

    with pytest.raises(RewardError, match="must return a list of 3 results .*got 1 results"):
        RewardManager(fn)(PROMPTS, RESPONSES, TRUTHS, {})


def test_batch_variant_raising_falls_back_for_every_sample():
    @batch_reward
    def fn(prompts, responses, ground_truths, **extra_lists):
        raise RuntimeError("judge offline")

    scores, metrics = RewardManager(fn, fallback_score=-1.0)(PROMPTS, RESPONSES, TRUTHS, {})
    assert scores.tolist() == [-1.0] * 3 and metrics["reward/num_failed"] == 3.0


BAD_RESULTS = {
    "raises": ZeroDivisionError("division by zero"),
    "none": None,
    "string": "1.0",
    "nan": float("nan"),
    "inf": math.inf,
    "no score": {"acc": 1.0},
    "nan score": {"score": float("nan")},
}


@pytest.mark.parametrize("kind", list(BAD_RESULTS))
def test_failures_get_the_fallback_and_are_counted(kind, caplog):
    def fn(prompt, response, ground_truth, **extra):
        if prompt == "2+2=":
            bad = BAD_RESULTS[kind]
            if isinstance(bad, Exception):
                raise bad
            return bad
        return np.float64(0.5)  # numpy scalars are numbers

    with caplog.at_level(logging.WARNING, logger="hybridflow.rewards"):
        scores, metrics = RewardManager(fn, fallback_score=-0.25)(PROMPTS, RESPONSES, TRUTHS, {})
    assert scores.tolist() == [0.5, -0.25, 0.5]
    assert metrics["reward/num_failed"] == 1.0
    [record] = [r for r in caplog.records if r.name == "hybridflow.rewards"]
    message = record.getMessage()
    assert "failed on 1 of 3 samples" in message and "sample 1" in message and "'2+2='" in message


def test_strict_mode_names_function_sample_and_cause():
    def picky(prompt, response, ground_truth, **extra):
        if response == "5":
            raise KeyError("missing_field")
        return 1.0

    long_prompt = "x" * 1000
    with pytest.raises(RewardError) as info:
        RewardManager(picky, strict=True)(["a", long_prompt, "c"], ["1", "5", "3"], TRUTHS, {})
    message = str(info.value)
    assert "picky" in message and "sample 1" in message
    assert "response='5'" in message and "(+800 chars)" in message  # prompt truncated to 200 chars
    assert "raised KeyError: 'missing_field'" in message
    assert isinstance(info.value.__cause__, KeyError)


def test_strict_mode_stops_at_the_first_failure_and_reports_bad_returns():
    calls = []

    def fn(prompt, response, ground_truth, **extra):
        calls.append(prompt)
        return {"acc": 1.0}

    with pytest.raises(RewardError, match=r"sample 0: .*returned a dict without 'score' \(keys: \['acc'\]\)"):
        RewardManager(fn, strict=True)(PROMPTS, RESPONSES, TRUTHS, {})
    assert calls == ["1+1="]


def test_thread_pool_keeps_order():
    scores, _ = RewardManager(exact, num_workers=4)(PROMPTS * 5, RESPONSES * 5, TRUTHS * 5, {})
    assert scores.tolist() == [1.0, 0.0, 1.0] * 5


def test_spec_strings_and_length_checks():
    manager = RewardManager("builtin:exact_match")
    assert manager(PROMPTS, [" 2 ", "4", "x"], TRUTHS, {})[0].tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(RewardError, match="data_source has 2 entries, prompts has 3"):
        manager(PROMPTS, RESPONSES, TRUTHS, {"data_source": ["a", "b"]})


def test_scores_to_token_level_places_scores_on_the_last_response_token():
    mask = torch.tensor([[1, 1, 1, 0, 0],
                         [1, 1, 1, 1, 1],
                         [0, 0, 0, 0, 0],
                         [1, 0, 0, 0, 0]])
    out = scores_to_token_level(np.array([0.5, -1.0, 3.0, 2.0], dtype=np.float32), mask)
    assert out.dtype == torch.float32
    assert out.tolist() == [[0, 0, 0.5, 0, 0], [0, 0, 0, 0, -1.0], [0] * 5, [2.0, 0, 0, 0, 0]]
    float_mask = mask.float()
    assert torch.equal(scores_to_token_level(torch.tensor([0.5, -1.0, 3.0, 2.0]), float_mask), out)
    with pytest.raises(ValueError, match="3 scores for a mask of 4 rows"):
        scores_to_token_level([1.0, 2.0, 3.0], mask)
