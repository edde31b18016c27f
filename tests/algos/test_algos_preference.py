"""Bradley–Terry preference loss: hand-computed values, gradients, margins, metrics, edge cases."""
import math

import pytest
import torch

from hybridflow.trainer.algos import (
    PREFERENCE_LOSSES,
    RegistryKeyError,
    bradley_terry_loss,
    get_preference_loss,
    preference_metrics,
)


def test_registered_by_name():
    assert get_preference_loss("bradley_terry") is bradley_terry_loss
    assert "bradley_terry" in PREFERENCE_LOSSES.names()
    with pytest.raises(RegistryKeyError, match="Did you mean 'bradley_terry'"):
        get_preference_loss("bradley_terri")


def test_equal_scores_give_log2_and_half_accuracy():
    loss, m = bradley_terry_loss(torch.tensor([0.3, -2.0]), torch.tensor([0.3, -2.0]))
    assert loss.item() == pytest.approx(math.log(2))
    assert m["rm/accuracy"].item() == 0.5  # ties count half
    assert m["rm/margin"].item() == 0.0


def test_hand_computed_values_and_metrics():
    chosen = torch.tensor([2.0, 0.0, 1.0])
    rejected = torch.tensor([1.0, 1.0, 1.0])  # d = [1, -1, 0]
    loss, m = bradley_terry_loss(chosen, rejected)
    # −log σ(1) = log(1 + e^−1) = 0.3132617; −log σ(−1) = log(1 + e) = 1.3132617; −log σ(0) = log 2 = 0.6931472
    assert loss.item() == pytest.approx((0.3132617 + 1.3132617 + 0.6931472) / 3, abs=1e-6)
    assert m["rm/accuracy"].item() == pytest.approx((1 + 0 + 0.5) / 3)
    assert m["rm/margin"].item() == pytest.approx(0.0)
    assert m["rm/chosen_score"].item() == pytest.approx(1.0) and m["rm/rejected_score"].item() == 1.0
    assert m["rm/loss"].item() == pytest.approx(loss.item())
    assert all(not v.requires_grad and v.ndim == 0 for v in m.values())


def test_gradient_is_minus_sigmoid_of_minus_gap_over_n():
    chosen = torch.tensor([2.0, 0.0], requires_grad=True)
    rejected = torch.tensor([1.0, 1.0], requires_grad=True)  # d = [1, -1]
    loss, _ = bradley_terry_loss(chosen, rejected)
    loss.backward()
    # d loss / d r_c,i = −σ(−d_i) / N: σ(−1) = 0.2689414, σ(1) = 0.7310586
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.2689414, -0.7310586]) / 2)
    torch.testing.assert_close(rejected.grad, -chosen.grad)


def test_margin_number_and_per_pair_tensor():
    chosen, rejected = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0])
    loss, m = bradley_terry_loss(chosen, rejected, margin=1.0)  # gaps minus margin: [0, 2]
    assert loss.item() == pytest.approx((math.log(2) + math.log(1 + math.exp(-2))) / 2)
    assert m["rm/margin"].item() == pytest.approx(2.0)  # the metric is the raw gap, without the margin
    per_pair, _ = bradley_terry_loss(chosen, rejected, margin=torch.tensor([1.0, 3.0]))  # [0, 0]
    assert per_pair.item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="margin must be"):
        bradley_terry_loss(chosen, rejected, margin=torch.tensor([1.0, 2.0, 3.0]))


def test_extreme_gaps_stay_finite():
    chosen = torch.tensor([1000.0, -1000.0], requires_grad=True)
    loss, m = bradley_terry_loss(chosen, torch.zeros(2))
    assert loss.item() == pytest.approx(500.0)  # (0 + 1000) / 2: softplus, no log(0)
    loss.backward()
    assert torch.isfinite(chosen.grad).all() and chosen.grad.tolist() == pytest.approx([0.0, -0.5])
    assert m["rm/accuracy"].item() == 0.5


def test_single_pair_and_extra_config_keys_are_ignored():
    loss, m = bradley_terry_loss(torch.tensor([0.5]), torch.tensor([-0.5]), unused_option=3)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))
    assert m["rm/accuracy"].item() == 1.0


@pytest.mark.parametrize("chosen,rejected", [
    (torch.zeros(3), torch.zeros(2)),      # different lengths
    (torch.zeros(2, 2), torch.zeros(2, 2)),  # not 1-D
    (torch.zeros(0), torch.zeros(0)),      # no pairs
])
def test_bad_shapes_raise(chosen, rejected):
    with pytest.raises(ValueError, match="preference loss"):
        bradley_terry_loss(chosen, rejected)


def test_metrics_alone():
    m = preference_metrics(torch.tensor([1.0, 0.0, 2.0, 5.0]), torch.tensor([0.0, 1.0, 2.0, 1.0]))
    assert m["rm/accuracy"].item() == pytest.approx(2.5 / 4)
    assert m["rm/margin"].item() == pytest.approx((1 - 1 + 0 + 4) / 4)
