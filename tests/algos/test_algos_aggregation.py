"""agg_loss modes on a ragged 2x3 example and empty rows."""
import pytest
import torch

from hybridflow.trainer.algos import agg_loss, agg_loss_modes, masked_mean, masked_whiten

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", 2.5),  # (1 + 2 + 3 + 4) / 4 tokens
        ("seq-mean-token-sum", 5.0),  # row sums 6 and 4 -> (6 + 4) / 2
        ("seq-mean-token-mean", 3.0),  # row means 6/3 = 2 and 4/1 = 4 -> (2 + 4) / 2
        ("seq-mean-token-sum-norm", 10.0 / 3.0),  # total 10 / R = 3 columns
    ],
)
def test_modes_on_ragged_mask(mode, expected):
    assert agg_loss(LOSS, MASK, mode).item() == pytest.approx(expected)
    # an extra all-masked row (with garbage, even inf) changes nothing: it is excluded
    loss3 = torch.cat([LOSS, torch.tensor([[float("inf"), 9.0, 9.0]])])
    mask3 = torch.cat([MASK, torch.zeros(1, 3, dtype=MASK.dtype)])
    assert agg_loss(loss3, mask3, mode).item() == pytest.approx(expected)


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", 2.0),  # 10 / 5
        ("seq-mean-token-sum", 2.0),  # (6 + 4) / 5
        ("seq-mean-token-mean", 1.2),  # (2 + 4) / 5
        ("seq-mean-token-sum-norm", 2.0),  # 10 / 5
    ],
)
def test_norm_constant_replaces_denominator(mode, expected):
    assert agg_loss(LOSS, MASK, mode, norm_constant=5).item() == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                  "seq-mean-token-sum-norm"])
def test_all_zero_mask_gives_zero_not_nan(mode):
    loss = LOSS.clone().requires_grad_(True)
    out = agg_loss(loss, torch.zeros(2, 3), mode)
    out.backward()
    assert out.item() == 0.0
    assert torch.equal(loss.grad, torch.zeros(2, 3))


def test_gradient_of_token_mean_is_mask_over_count():
    loss = LOSS.clone().requires_grad_(True)
    agg_loss(loss, MASK, "token-mean").backward()
    torch.testing.assert_close(loss.grad, MASK.float() / 4)


def test_modes_listed_and_shape_check():
    assert agg_loss_modes() == sorted(
        ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
    )
    with pytest.raises(ValueError, match="shape"):
        agg_loss(LOSS, MASK[:, :2], "token-mean")


def test_masked_helpers():
    x = torch.tensor([[1.0, 3.0, float("nan")]])
    m = torch.tensor([[1, 1, 0]])
    assert masked_mean(x, m).item() == 2.0  # (1 + 3) / 2, the nan on padding ignored
    assert masked_mean(x, m, dim=-1).tolist() == [2.0]
    assert masked_mean(x, torch.zeros(1, 3)).item() == 0.0
    # whiten [1, 3]: mean 2, unbiased var ((-1)^2 + 1^2) / 1 = 2 -> -+1/sqrt(2)
    w = masked_whiten(x, m)
    torch.testing.assert_close(w[:, :2], torch.tensor([[-(0.5**0.5), 0.5**0.5]]))
