"""RLOO, REINFORCE++(-baseline) and ReMax advantage estimators (trainer/algos/baselines.py),
checked against values computed by hand, plus their edge cases: groups of identical rewards,
all-masked rows, length-1 responses, singleton groups."""
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from hybridflow import DataProto
from hybridflow.trainer.algos import ADVANTAGES, get_advantage
from hybridflow.trainer.algos.baselines import (
    reinforce_plus_plus_advantage,
    reinforce_plus_plus_baseline_advantage,
    remax_advantage,
    rloo_advantage,
)
from hybridflow.trainer.rl import compute_advantages

T = torch.tensor


def outcome(scores, lengths, width=3):
    """Rewards with each score on the last valid token of a row of ``lengths[i]`` tokens."""
    rewards, mask = torch.zeros(len(scores), width), torch.zeros(len(scores), width)
    for i, (s, n) in enumerate(zip(scores, lengths)):
        mask[i, :n] = 1
        if n:
            rewards[i, n - 1] = s
    return rewards, mask


def per_row(adv, mask):
    """The single value each row holds on its valid tokens (asserting it is constant there and 0
    outside the mask)."""
    assert torch.all(adv[mask == 0] == 0)
    out = []
    for a, m in zip(adv, mask):
        vals = a[m != 0]
        if len(vals):
            assert torch.all(vals == vals[0]), f"row not constant over its tokens: {a}"
        out.append(float(vals[0]) if len(vals) else 0.0)
    return out


def test_all_four_are_registered():
    assert {"rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "remax"} <= set(ADVANTAGES.names())
    assert get_advantage("rloo") is rloo_advantage
    assert get_advantage("remax") is remax_advantage
    papers = {"rloo": "Back to Basics", "reinforce_plus_plus": "REINFORCE++",
              "reinforce_plus_plus_baseline": "REINFORCE++", "remax": "ReMax"}
    for name, paper in papers.items():
        assert paper in get_advantage(name).__doc__ and "A_" in get_advantage(name).__doc__  # cited, formula


# ----------------------------------------------------------------------------- RLOO
def test_rloo_hand_computed():
    # group a: 1, 0, 0 → 1 − 0 = 1, 0 − (1+0)/2 = −0.5 (twice); group b: 3, 1 → 3 − 1 = 2, 1 − 3 = −2
    rewards, mask = outcome([1.0, 0.0, 0.0, 3.0, 1.0], [3, 2, 1, 2, 3])
    adv, ret = rloo_advantage(rewards, mask, index=["a", "a", "a", "b", "b"])
    assert per_row(adv, mask) == [1.0, -0.5, -0.5, 2.0, -2.0]
    assert torch.equal(ret, adv)
    assert adv.dtype == torch.float32


def test_rloo_equals_scaled_group_centering():
    """A_i = n/(n−1)·(r_i − mean): the leave-one-out form and the scaled form agree."""
    r = T([0.2, 0.9, 0.4, 0.7])
    adv, _ = rloo_advantage(r[:, None], torch.ones(4, 1), index=[0, 0, 0, 0])
    expected = 4 / 3 * (r - r.mean())
    assert torch.allclose(adv[:, 0], expected, atol=1e-6)


def test_rloo_identical_rewards_and_singletons_are_exactly_zero():
    # 0.1 three times: the leave-one-out mean is 0.1 only up to rounding; the result must be 0 exactly
    rewards, mask = outcome([0.1, 0.1, 0.1, 1.0, 0.7], [2, 3, 1, 2, 1])
    adv, _ = rloo_advantage(rewards, mask, index=["a", "a", "a", "solo", "solo2"])
    assert torch.all(adv == 0)


def test_rloo_all_masked_row_is_left_out_of_its_group():
    # row 2 has no valid token: its (garbage) reward is never read and it is not an "other" sample
    rewards, mask = outcome([1.0, 0.0, 0.0], [2, 2, 0])
    rewards[2] = torch.tensor([float("nan"), 50.0, float("inf")])
    adv, _ = rloo_advantage(rewards, mask, index=["a", "a", "a"])
    assert per_row(adv, mask) == [1.0, -1.0, 0.0]
    assert torch.all(adv[2] == 0)
    # a group whose only other member is masked is a singleton: 0
    adv, _ = rloo_advantage(rewards[[0, 2]], mask[[0, 2]], index=["a", "a"])
    assert torch.all(adv == 0)


def test_rloo_length_one_responses_and_tensor_index():
    rewards, mask = outcome([1.0, 0.0], [1, 1], width=1)
    adv, _ = rloo_advantage(rewards, mask, index=torch.tensor([7, 7]))
    assert adv.tolist() == [[1.0], [-1.0]]


def test_rloo_sums_token_rewards_kl_included():
    """With a KL penalty in the reward, r_i is the sum over the row's valid tokens."""
    rewards = T([[-0.1, -0.1, 1.0], [-0.2, 0.0, 0.0]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, _ = rloo_advantage(rewards, mask, index=["a", "a"])
    assert per_row(adv, mask) == pytest.approx([0.8 - -0.2, -0.2 - 0.8])


def test_rloo_errors():
    rewards, mask = outcome([1.0, 0.0], [1, 1])
    with pytest.raises(ValueError, match="index"):
        rloo_advantage(rewards, mask)
    with pytest.raises(ValueError, match="same"):
        rloo_advantage(rewards, mask[:, :2], index=["a", "a"])
    with pytest.raises(ValueError, match="entries"):
        rloo_advantage(rewards, mask, index=["a"])


# ----------------------------------------------------------------------------- REINFORCE++
def test_reinforce_pp_outcome_reward_hand_computed():
    # row 0: score 1 on its 3rd token → G = 1, 1, 1; row 1: score 0, 2 tokens → G = 0, 0.
    # valid G: 1, 1, 1, 0, 0 → mean 0.6, unbiased var (3·0.16 + 2·0.36) / 4 = 0.3
    rewards, mask = outcome([1.0, 0.0], [3, 2])
    adv, ret = reinforce_plus_plus_advantage(rewards, mask, gamma=1.0)
    assert ret.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    hi, lo = 0.4 / math.sqrt(0.3 + 1e-8), -0.6 / math.sqrt(0.3 + 1e-8)
    assert adv.flatten().tolist() == pytest.approx([hi, hi, hi, lo, lo, 0.0], abs=1e-6)
    assert adv[1, 2] == 0


def test_reinforce_pp_discounted_token_returns_with_kl():
    # row 0: per-token KL −0.1, −0.2, −0.3 and score 1 on the last token → r = −0.1, −0.2, 0.7
    rewards = T([[-0.1, -0.2, 0.7], [0.0, 0.0, 0.0]])
    mask = torch.ones(2, 3)
    _, ret = reinforce_plus_plus_advantage(rewards, mask, gamma=1.0)
    assert ret[0].tolist() == pytest.approx([0.4, 0.5, 0.7])
    # γ = 0.5: G2 = 0.7, G1 = −0.2 + 0.35 = 0.15, G0 = −0.1 + 0.075 = −0.025
    adv, ret = reinforce_plus_plus_advantage(rewards, mask, gamma=0.5)
    assert ret[0].tolist() == pytest.approx([-0.025, 0.15, 0.7])
    g = torch.tensor([-0.025, 0.15, 0.7, 0.0, 0.0, 0.0], dtype=torch.float64)
    expected = (g - g.mean()) / torch.sqrt(g.var() + 1e-8)  # torch.var: unbiased
    assert adv.flatten().tolist() == pytest.approx(expected.tolist(), abs=1e-6)


def test_reinforce_pp_skips_masked_positions():
    # a hole at t=1 (reward 9 there is never read): G2 = 1, G0 = 0.5 + 0.5·1 = 1.0
    rewards = T([[0.5, 9.0, 1.0], [0.0, 0.0, 0.0]])
    mask = T([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    adv, ret = reinforce_plus_plus_advantage(rewards, mask, gamma=0.5)
    assert ret.tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    assert adv[0, 1] == 0 and adv[1, 1] == 0 and adv[1, 2] == 0
    # garbage (NaN/inf) on padding never reaches the valid tokens or the batch statistics
    rewards[1, 1:] = torch.tensor([float("nan"), float("inf")])
    adv2, ret2 = reinforce_plus_plus_advantage(rewards, mask, gamma=0.5)
    assert torch.equal(adv2, adv) and torch.equal(ret2, ret)


def test_reinforce_pp_no_signal_is_zero():
    # all returns equal (here 0.1 everywhere): exactly 0, not (x − mean)·1e4 rounding noise
    rewards, mask = outcome([0.1, 0.1, 0.1], [1, 1, 1])
    adv, ret = reinforce_plus_plus_advantage(rewards, mask)
    assert torch.all(adv == 0) and ret[:, 0].tolist() == pytest.approx([0.1] * 3)
    # a single valid token in the whole batch (length-1 response, other row all masked)
    rewards, mask = outcome([1.0, 5.0], [1, 0])
    adv, ret = reinforce_plus_plus_advantage(rewards, mask)
    assert torch.all(adv == 0) and ret.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    # everything masked
    adv, ret = reinforce_plus_plus_advantage(torch.ones(2, 3), torch.zeros(2, 3))
    assert torch.all(adv == 0) and torch.all(ret == 0)


def test_reinforce_pp_length_one_responses():
    rewards, mask = outcome([1.0, 0.0, 0.0, 0.0], [1, 1, 1, 1], width=1)
    adv, _ = reinforce_plus_plus_advantage(rewards, mask)
    # values 1, 0, 0, 0: mean 0.25, unbiased var (0.5625 + 3·0.0625) / 3 = 0.25 → std 0.5
    assert adv[:, 0].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-6)


def test_reinforce_pp_ignores_index():
    rewards, mask = outcome([1.0, 0.0, 1.0], [2, 2, 1])
    a, _ = reinforce_plus_plus_advantage(rewards, mask)
    b, _ = reinforce_plus_plus_advantage(rewards, mask, index=["x", "y", "x"], norm_adv_by_std=True, lam=0.9)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- REINFORCE++-baseline
def test_reinforce_pp_baseline_hand_computed():
    # group a: 1 (2 tokens), 0 (1 token) → centred +0.5, −0.5; group b: 1, 1 → 0, 0 (1 and 2 tokens)
    # per valid token: 0.5, 0.5, −0.5, 0, 0, 0 → mean 1/12; squared deviations
    # 2·(5/12)² + (7/12)² + 3·(1/12)² = 102/144, unbiased var = 102/720
    rewards, mask = outcome([1.0, 0.0, 1.0, 1.0], [2, 1, 1, 2])
    adv, ret = reinforce_plus_plus_baseline_advantage(rewards, mask, index=["a", "a", "b", "b"])
    std = math.sqrt(102 / 720 + 1e-8)
    assert per_row(adv, mask) == pytest.approx([(5 / 12) / std, (-7 / 12) / std, (-1 / 12) / std, (-1 / 12) / std],
                                               abs=1e-6)
    assert torch.equal(ret, adv)


def test_reinforce_pp_baseline_singleton_and_identical_groups_centre_to_zero():
    # every group is a singleton or has equal rewards → no signal at all: exactly 0 everywhere
    rewards, mask = outcome([0.1, 0.1, 0.1, 1.0], [1, 2, 3, 1])
    adv, _ = reinforce_plus_plus_baseline_advantage(rewards, mask, index=["a", "a", "a", "solo"])
    assert torch.all(adv == 0)
    # n = 1 everywhere (one sample per prompt): no group baseline, no signal
    rewards, mask = outcome([1.0, 0.0], [1, 1])
    adv, _ = reinforce_plus_plus_baseline_advantage(rewards, mask, index=["p", "q"])
    assert torch.all(adv == 0)


def test_reinforce_pp_baseline_all_masked_row():
    rewards, mask = outcome([1.0, 0.0, 0.0], [1, 1, 0])
    rewards[2] = float("nan")
    adv, _ = reinforce_plus_plus_baseline_advantage(rewards, mask, index=["a", "a", "a"])
    # valid tokens: +0.5, −0.5 → mean 0, unbiased var 0.5
    s = math.sqrt(0.5 + 1e-8)
    assert adv[:, 0].tolist() == pytest.approx([0.5 / s, -0.5 / s, 0.0], abs=1e-6)
    assert torch.all(adv[:, 1:] == 0) and not torch.isnan(adv).any()
    with pytest.raises(ValueError, match="index"):
        reinforce_plus_plus_baseline_advantage(rewards, mask)


# ----------------------------------------------------------------------------- ReMax
def test_remax_hand_computed():
    # sampled 1, 0, 1, 0.5 against greedy 0, 0, 1, 1 → 1, 0, 0, −0.5 on every valid token
    rewards, mask = outcome([1.0, 0.0, 1.0, 0.5], [3, 1, 2, 1])
    adv, ret = remax_advantage(rewards, mask, index=["a", "a", "b", "c"], baseline_scores=T([0.0, 0.0, 1.0, 1.0]))
    assert per_row(adv, mask) == [1.0, 0.0, 0.0, -0.5]
    assert torch.equal(ret, adv)
    assert adv.tolist()[0] == [1.0, 1.0, 1.0] and adv.tolist()[1] == [0.0, 0.0, 0.0]


def test_remax_edge_cases():
    # length-1 responses, a list baseline, an all-masked row (garbage reward never read) → 0
    rewards, mask = outcome([1.0, 0.0, 0.0], [1, 1, 0], width=1)
    rewards[2, 0] = float("nan")
    adv, _ = remax_advantage(rewards, mask, baseline_scores=[0.5, 0.5, 0.5])
    assert adv[:, 0].tolist() == [0.5, -0.5, 0.0]
    # a greedy response as good as the sample gives 0 (identical rewards: no signal)
    adv, _ = remax_advantage(rewards[:2], mask[:2], baseline_scores=T([1.0, 0.0]))
    assert torch.all(adv == 0)


def test_remax_needs_an_aligned_baseline():
    rewards, mask = outcome([1.0, 0.0], [1, 1])
    with pytest.raises(ValueError, match="baseline_scores"):
        remax_advantage(rewards, mask, index=["a", "b"])
    with pytest.raises(ValueError, match="3 entries but the batch has 2 rows"):
        remax_advantage(rewards, mask, baseline_scores=T([0.0, 0.0, 0.0]))


# ----------------------------------------------------------------------------- through the trainer
def rollout_batch():
    rewards, mask = outcome([1.0, 0.0, 0.0, 1.0], [2, 3, 1, 2])
    batch = DataProto.from_dict({"token_level_scores": rewards, "response_mask": mask},
                                {"uid": np.array(["p0", "p0", "p1", "p1"], dtype=object)})
    return batch


@pytest.mark.parametrize("name", ["rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"])
def test_compute_advantages_runs_them_by_name(name):
    """compute_advantages passes the whole algorithm section (gamma, lam, norm_adv_by_std...) as
    options: the estimators accept and ignore what they do not use."""
    batch = rollout_batch()
    cfg = {"adv_estimator": name, "norm_adv_by_std": True, "gamma": 1.0, "lam": 1.0, "use_kl_in_reward": False,
           "kl_penalty": "k1", "kl_ctrl": {"type": "fixed", "kl_coef": 0.001}}
    compute_advantages(batch, OmegaConf.create(cfg))
    adv, mask = batch.batch["advantages"], batch.batch["response_mask"]
    assert adv.shape == mask.shape and torch.all(adv[mask == 0] == 0) and adv.abs().sum() > 0
    if name == "rloo":
        assert per_row(adv, mask) == [1.0, -1.0, -1.0, 1.0]


def test_compute_advantages_without_remax_baseline_names_the_cause():
    with pytest.raises(ValueError, match="baseline_scores"):
        compute_advantages(rollout_batch(), OmegaConf.create({"adv_estimator": "remax"}))
