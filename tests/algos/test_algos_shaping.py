"""DAPO's overlong penalty and dynamic-sampling group filter."""
import numpy as np
import pytest
import torch

from hybridflow.trainer.algos.shaping import add_overlong_penalty, groups_with_signal, overlong_penalty


def test_overlong_penalty_piecewise():
    # L_max = 8, L_cache = 2: 0 up to 6, then -1/2 per token, -1 from 8 on (and beyond)
    lengths = torch.tensor([0, 5, 6, 7, 8, 9])
    assert overlong_penalty(lengths, 8, 2).tolist() == [0.0, 0.0, 0.0, -0.5, -1.0, -1.0]
    assert overlong_penalty(lengths, 8, 2, penalty_factor=0.5).tolist() == [0.0, 0.0, 0.0, -0.25, -0.5, -0.5]
    # L_max = 20, L_cache = 4: L = 17 -> (16 - 17) / 4 = -0.25
    assert overlong_penalty(torch.tensor([16, 17, 19]), 20, 4).tolist() == [0.0, -0.25, -0.75]
    assert overlong_penalty(lengths, 8, 0).tolist() == [0.0] * 6  # buffer 0: off
    with pytest.raises(ValueError, match="buffer_length"):
        overlong_penalty(lengths, 8, 9)


def test_add_overlong_penalty_on_the_last_token():
    scores = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]])
    shaped, penalty = add_overlong_penalty(scores, mask, max_length=4, buffer_length=2)
    # lengths 3, 4, 0 (empty row: untouched), 1 -> penalties -0.5, -1, 0, 0
    assert penalty.tolist() == [-0.5, -1.0, 0.0, 0.0]
    assert shaped.tolist() == [[0.0, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0] * 4, [1.0, 0.0, 0.0, 0.0]]
    assert scores[0, 2] == 1.0  # input not modified


def test_groups_with_signal():
    uids = np.array(["a", "a", "b", "b", "c", "d", "d", "d"], dtype=object)
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.5])
    # a: mixed -> keep; b: all correct -> drop; c: single sample -> drop; d: one differs -> keep
    assert groups_with_signal(scores, uids).tolist() == [True, True, False, False, False, True, True, True]
    assert groups_with_signal([0.0, 0.0], ["x", "x"]).tolist() == [False, False]
    with pytest.raises(ValueError, match="group ids"):
        groups_with_signal(scores, uids[:3])
