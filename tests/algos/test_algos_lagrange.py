"""Safe RLHF's pieces: the Lagrange multiplier's dual step and state, the combined advantage."""
import math

import pytest
import torch

from hybridflow.trainer.algos import LagrangeMultiplier, gae_advantage, lagrangian_advantage, make_lagrange


def test_lambda_grows_while_the_cost_is_above_the_threshold_and_shrinks_to_zero_below():
    lag = LagrangeMultiplier(threshold=0.2, lr=0.5)
    seen = []
    for cost in [0.6, 0.4, 0.2, 0.0, 0.0, 0.0, 0.0]:
        metrics = lag.update(cost)
        seen.append((metrics["lagrange/lambda"], metrics["lagrange/cost_gap"]))
    # λ: 0 + 0.5·0.4 = 0.2; + 0.5·0.2 = 0.3; + 0 = 0.3; − 0.1 = 0.2; 0.1; 0.0; max(0, −0.1) = 0 (projected)
    assert [round(v, 12) for v, _ in seen] == [0.2, 0.3, 0.3, 0.2, 0.1, 0.0, 0.0]
    assert [round(g, 12) for _, g in seen] == [0.4, 0.2, 0.0, -0.2, -0.2, -0.2, -0.2]
    assert lag.value == 0.0  # exactly zero, not a small negative number


def test_lambda_from_a_tensor_cost_with_init_and_cap():
    lag = LagrangeMultiplier(threshold=0.0, lr=1.0, init=0.25, max_value=0.5)
    assert lag.update(torch.tensor(0.125))["lagrange/lambda"] == 0.375
    assert lag.update(torch.tensor([1.0]).mean())["lagrange/lambda"] == 0.5  # 1.375 capped at max_value
    assert LagrangeMultiplier(threshold=1.0, lr=0.0, init=2.0).update(5.0)["lagrange/lambda"] == 2.0  # lr 0: fixed λ


@pytest.mark.parametrize("kwargs, match", [
    (dict(threshold=0.1, lr=-1.0), "lr must be >= 0"),
    (dict(threshold=0.1, lr=1.0, init=-0.5), "init must be >= 0"),
    (dict(threshold=float("nan"), lr=1.0), "threshold must be a finite number"),
    (dict(threshold=0.1, lr=1.0, init=2.0, max_value=1.0), "max_value 1.0 is below init 2.0"),
])
def test_bad_multiplier_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LagrangeMultiplier(**kwargs)


def test_a_non_finite_cost_raises_and_leaves_lambda_alone():
    lag = LagrangeMultiplier(threshold=0.1, lr=1.0, init=0.3)
    with pytest.raises(ValueError, match="mean episode cost is nan"):
        lag.update(torch.tensor(float("nan")))  # e.g. the mean over an empty batch
    assert lag.value == 0.3


def test_state_round_trip_continues_the_same_trajectory():
    a = LagrangeMultiplier(threshold=0.2, lr=0.5)
    for cost in (0.9, 0.7):
        a.update(cost)
    state = a.state_dict()
    assert state == {"value": pytest.approx(0.6)}  # 0.5·0.7 + 0.5·0.5
    b = LagrangeMultiplier(threshold=0.2, lr=0.5)
    b.load_state_dict(state)
    assert [a.update(c)["lagrange/lambda"] for c in (0.0, 0.5)] == [b.update(c)["lagrange/lambda"] for c in (0.0, 0.5)]
    with pytest.raises(ValueError, match="λ must be a finite number >= 0"):
        b.load_state_dict({"value": -1.0})


def test_make_lagrange_from_config():
    lag = make_lagrange({"threshold": 0.15, "lr": 1.0, "init": 0.0, "max_value": None})
    assert (lag.threshold, lag.lr, lag.value, lag.max_value) == (0.15, 1.0, 0.0, None)
    with pytest.raises(ValueError, match=r"unknown Lagrange multiplier key\(s\) \['treshold'\]"):
        make_lagrange({"treshold": 0.1, "lr": 1.0})
    with pytest.raises(ValueError, match="needs threshold"):
        make_lagrange({"lr": 1.0})


A_R = torch.tensor([[1.0, 2.0, 0.0], [-1.0, 0.0, 0.0]])
A_C = torch.tensor([[0.5, -1.0, 0.0], [2.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_lambda_zero_gives_the_reward_advantage():
    torch.testing.assert_close(lagrangian_advantage(A_R, A_C, 0.0, MASK), A_R * MASK, rtol=0, atol=0)


@pytest.mark.parametrize("lam, expected", [
    (1.0, [[0.25, 1.5, 0.0], [-1.5, 0.0, 0.0]]),   # (A_r − A_c) / 2
    (3.0, [[-0.125, 1.25, 0.0], [-1.75, 0.0, 0.0]]),  # (A_r − 3·A_c) / 4
])
def test_combined_advantage_by_hand(lam, expected):
    torch.testing.assert_close(lagrangian_advantage(A_R, A_C, torch.tensor(lam), MASK), torch.tensor(expected))


def test_large_lambda_follows_the_negative_cost_advantage():
    out = lagrangian_advantage(A_R, A_C, 1e6, MASK)
    torch.testing.assert_close(out, -A_C * MASK, atol=1e-5, rtol=0)


def test_masked_positions_and_all_masked_rows_are_zero():
    garbage = torch.full((2, 3), 7.0)  # values outside the mask must not leak through
    mask = torch.tensor([[0, 0, 0], [1, 1, 0]])
    out = lagrangian_advantage(garbage, -garbage, 0.5, mask)
    # (7 + 0.5·7) / 1.5 = 7 on valid tokens, 0 elsewhere (the all-masked row included)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 0.0], [7.0, 7.0, 0.0]]))


def test_with_gae_on_length_one_responses():
    """Two length-1 responses, values 0: rewards [1, 0] and costs [0, 1] whiten to ±1/√2
    (unbiased variance 0.5); λ = 1 gives ((1/√2) − (−1/√2)) / 2 = 1/√2 for the first row."""
    mask = torch.tensor([[1.0], [1.0]])
    zeros = torch.zeros(2, 1)
    a_r, _ = gae_advantage(torch.tensor([[1.0], [0.0]]), mask, values=zeros, gamma=1.0, lam=1.0)
    a_c, ret_c = gae_advantage(torch.tensor([[0.0], [1.0]]), mask, values=zeros, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret_c, torch.tensor([[0.0], [1.0]]))  # cost returns for the cost critic
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(lagrangian_advantage(a_r, a_c, 1.0, mask), torch.tensor([[r], [-r]]), atol=1e-6, rtol=0)


def test_identical_rewards_leave_only_the_cost_term():
    """A group whose rewards are all equal has A_r = 0: the actor then only moves away from cost."""
    mask = torch.ones(3, 2)
    a_r, _ = gae_advantage(torch.tensor([[0.0, 1.0]] * 3), mask, values=torch.zeros(3, 2), gamma=1.0, lam=1.0)
    assert torch.equal(a_r, torch.zeros(3, 2))
    a_c = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [0.0, 0.0]])
    torch.testing.assert_close(lagrangian_advantage(a_r, a_c, 0.25, mask), -0.2 * a_c)  # −λ/(1+λ)·A_c


def test_bad_lambda_or_shapes_raise():
    with pytest.raises(ValueError, match="λ must be a finite number >= 0, got -0.1"):
        lagrangian_advantage(A_R, A_C, -0.1, MASK)
    with pytest.raises(ValueError, match=r"same \[B, R\] shape"):
        lagrangian_advantage(A_R, A_C[:, :2], 0.5, MASK)
