"""Advantage estimators on hand-computed examples."""
import math

import numpy as np
import pytest
import torch

from hybridflow.trainer.algos import get_advantage

gae = get_advantage("gae")
grpo = get_advantage("grpo")


def close(actual, expected, atol=1e-5):
    expected = torch.tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# ----------------------------------------------------------------------------------- GAE

def _gae_example():
    # gamma = lam = 0.5, so gamma * lam = 0.25.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])  # 9.0 sits on padding
    values = torch.tensor([[0.5, 1.0, 0.5], [1.0, 0.5, 7.0]])  # 7.0 sits on padding
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # row 1 ends after 2 tokens
    return rewards, values, mask


def test_gae_three_tokens_and_early_mask():
    rewards, values, mask = _gae_example()
    adv, ret = gae(rewards, mask, values=values, gamma=0.5, lam=0.5)
    # Row 0 (V after the last token = 0):
    #   t=2: delta = 1 + 0.5*0   - 0.5 =  0.5    A2 =  0.5
    #   t=1: delta = 0 + 0.5*0.5 - 1.0 = -0.75   A1 = -0.75 + 0.25*0.5    = -0.625
    #   t=0: delta = 0 + 0.5*1.0 - 0.5 =  0      A0 =  0    + 0.25*-0.625 = -0.15625
    # Row 1 (episode ends at t=1: the padding value 7.0 must NOT be bootstrapped):
    #   t=1: delta = 2 + 0.5*0   - 0.5 =  1.5    A1 =  1.5
    #   t=0: delta = 0 + 0.5*0.5 - 1.0 = -0.75   A0 = -0.75 + 0.25*1.5 = -0.375
    # returns = A + V on valid tokens, 0 on padding.
    close(ret, [[-0.15625 + 0.5, -0.625 + 1.0, 0.5 + 0.5], [-0.375 + 1.0, 1.5 + 0.5, 0.0]])
    # Whitening over the 5 valid raw advantages [-0.15625, -0.625, 0.5, -0.375, 1.5]:
    #   mean = 0.84375 / 5 = 0.16875
    #   deviations -0.325, -0.79375, 0.33125, -0.54375, 1.33125
    #   squares sum = 0.105625 + 0.6300390625 + 0.1097265625 + 0.2956640625 + 1.7722265625
    #               = 2.91328125;  unbiased var = 2.91328125 / 4 = 0.7283203125
    std = math.sqrt(0.7283203125)
    expected = [
        [-0.325 / std, -0.79375 / std, 0.33125 / std],
        [-0.54375 / std, 1.33125 / std, 0.0],
    ]
    close(adv, expected)
    assert adv[1, 2] == 0 and ret[1, 2] == 0


def test_gae_padding_garbage_does_not_leak():
    rewards, values, mask = _gae_example()
    adv_a, ret_a = gae(rewards, mask, values=values, gamma=0.5, lam=0.5)
    rewards_b, values_b = rewards.clone(), values.clone()
    rewards_b[1, 2], values_b[1, 2] = -100.0, float("nan")
    adv_b, ret_b = gae(rewards_b, mask, values=values_b, gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv_a, adv_b)
    torch.testing.assert_close(ret_a, ret_b)


def test_gae_skips_a_hole_in_the_mask():
    # mask [1, 0, 1]: position 1 is skipped (its reward 5 and value 9 are never read).
    rewards = torch.tensor([[0.0, 5.0, 1.0]])
    values = torch.tensor([[0.5, 9.0, 0.5]])
    mask = torch.tensor([[1, 0, 1]])
    _, ret = gae(rewards, mask, values=values, gamma=0.5, lam=0.5)
    #   t=2: delta = 1 - 0.5 = 0.5, A2 = 0.5
    #   t=0: next valid is t=2: delta = 0 + 0.5*0.5 - 0.5 = -0.25, A0 = -0.25 + 0.25*0.5 = -0.125
    close(ret, [[-0.125 + 0.5, 0.0, 0.5 + 0.5]])


def test_gae_length_one_responses():
    rewards = torch.tensor([[2.0], [0.0]])
    values = torch.tensor([[0.5], [0.5]])
    adv, ret = gae(rewards, torch.ones(2, 1), values=values, gamma=0.9, lam=0.95)
    # A = r - V: 1.5 and -0.5 -> returns 2.0, 0.0
    close(ret, [[2.0], [0.0]])
    # whiten: mean 0.5, unbiased var (1 + 1) / 1 = 2 -> +-1/sqrt(2)
    close(adv, [[1 / math.sqrt(2)], [-1 / math.sqrt(2)]])


def test_gae_all_masked_row_and_missing_values():
    rewards = torch.tensor([[1.0, 0.0], [3.0, 3.0]])
    values = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    adv, ret = gae(rewards, torch.tensor([[1, 0], [0, 0]]), values=values)
    assert torch.isfinite(adv).all()
    assert adv[1].tolist() == [0.0, 0.0] and ret[1].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="values"):
        gae(rewards, torch.ones(2, 2))


# ---------------------------------------------------------------------------------- GRPO

def _grpo_example():
    # Rewards on the last valid token; groups "a" (rows 0, 1, 3) and "b" (rows 2, 4).
    rewards = torch.tensor(
        [
            [0.0, 0.0, 1.0],  # a, len 3, r = 1
            [0.0, 0.0, 0.0],  # a, len 2, r = 0
            [1.0, 0.0, 0.0],  # b, len 1, r = 1   (length-1 response)
            [0.0, 0.0, 0.0],  # a, len 3, r = 0
            [0.0, 3.0, 0.0],  # b, len 2, r = 3
        ]
    )
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]])
    index = np.array(["a", "a", "b", "a", "b"], dtype=object)
    return rewards, mask, index


def test_grpo_with_std_normalisation():
    rewards, mask, index = _grpo_example()
    adv, ret = grpo(rewards, mask, index=index)
    # group a: r = [1, 0, 0], mean 1/3, unbiased std = sqrt(((2/3)^2 + 2 (1/3)^2) / 2)
    #          = sqrt(1/3) -> A = (2/3)/sqrt(1/3) = 2/sqrt(3), (-1/3)/sqrt(1/3) = -1/sqrt(3)
    # group b: r = [1, 3], mean 2, unbiased std = sqrt((1 + 1) / 1) = sqrt(2) -> A = -+1/sqrt(2)
    a_hi, a_lo, b = 2 / math.sqrt(3), -1 / math.sqrt(3), 1 / math.sqrt(2)
    close(adv, [[a_hi] * 3, [a_lo, a_lo, 0.0], [-b, 0.0, 0.0], [a_lo] * 3, [b, b, 0.0]])
    torch.testing.assert_close(adv, ret)


def test_grpo_without_std_normalisation():
    rewards, mask, index = _grpo_example()
    adv, _ = grpo(rewards, mask, index=index, norm_adv_by_std=False)
    # group a: r - 1/3 = 2/3, -1/3, -1/3;  group b: r - 2 = -1, +1
    t, o = 2 / 3, -1 / 3
    close(adv, [[t] * 3, [o, o, 0.0], [-1.0, 0.0, 0.0], [o] * 3, [1.0, 1.0, 0.0]])


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_identical_rewards_and_singletons_give_exact_zero(norm):
    rewards = torch.tensor([[0.1, 0.0], [0.1, 0.0], [0.1, 0.0], [7.0, 0.0]])
    mask = torch.ones(4, 2)
    index = [("p", 1), ("p", 1), ("p", 1), 42]  # any hashable works; 42 is a singleton group
    adv, ret = grpo(rewards, mask, index=index, norm_adv_by_std=norm)
    assert not torch.isnan(adv).any()
    assert torch.equal(adv, torch.zeros(4, 2)) and torch.equal(ret, torch.zeros(4, 2))


def test_grpo_all_masked_row_is_excluded_from_its_group():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 50.0]])
    mask = torch.tensor([[1, 1], [1, 1], [0, 0]])  # row 2 has no tokens (its 50 is ignored)
    adv, _ = grpo(rewards, mask, index=np.array([0, 0, 0]))
    # remaining rows r = [1, 0]: mean 0.5, unbiased std sqrt(0.5) -> +-0.5/sqrt(0.5) = +-sqrt(0.5)
    s = math.sqrt(0.5)
    close(adv, [[s, s], [-s, -s], [0.0, 0.0]])


def test_grpo_ignores_unknown_cfg_and_needs_index():
    rewards, mask, index = _grpo_example()
    adv, _ = grpo(rewards, mask, index=index, gamma=1.0, lam=0.9, some_future_key="x")
    assert adv.shape == (5, 3)
    with pytest.raises(ValueError, match="index"):
        grpo(rewards, mask)
    with pytest.raises(ValueError, match="3 entries"):
        grpo(rewards, mask, index=["a", "b", "c"])
