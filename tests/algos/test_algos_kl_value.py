"""KL kinds, in-reward KL, KL controllers, value loss, entropy."""
import pytest
import torch

from hybridflow.trainer.algos import (
    AdaptiveKLController,
    FixedKLController,
    apply_kl_penalty_to_reward,
    entropy_from_logits,
    kl_penalty,
    make_kl_controller,
    value_loss,
)

LOGP = torch.tensor([[-1.0, -2.0]])
REF = torch.tensor([[-1.5, -1.0]])  # logp - ref = [0.5, -1.0]


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("k1", [0.5, -1.0]),
        ("kl", [0.5, -1.0]),
        ("abs", [0.5, 1.0]),
        ("k2", [0.125, 0.5]),  # 0.5 * 0.25, 0.5 * 1
        ("mse", [0.125, 0.5]),
        # x = ref - logp = [-0.5, 1.0]: exp(-0.5) + 0.5 - 1 = 0.6065307 - 0.5 = 0.1065307
        #                               exp(1) - 1 - 1 = 2.7182818 - 2 = 0.7182818
        ("k3", [0.1065307, 0.7182818]),
        ("low_var_kl", [0.1065307, 0.7182818]),
    ],
)
def test_kl_kinds(kind, expected):
    actual = kl_penalty(LOGP, REF, kind)
    torch.testing.assert_close(actual, torch.tensor([expected]), atol=1e-6, rtol=0)


def test_k3_is_clamped_and_keeps_finite_gradients():
    logp = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[5.0, 30.0, 1000.0]])  # exp(5) - 6 = 142.4 > 10; others overflow-prone
    kl = kl_penalty(logp, ref, "k3")
    assert kl.tolist() == [[10.0, 10.0, 10.0]]
    kl.sum().backward()
    assert torch.isfinite(logp.grad).all()


def test_apply_kl_penalty_to_reward():
    scores = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    ref = torch.zeros(2, 3)
    logp = torch.tensor([[0.1, 0.2, 0.3], [0.4, -0.2, 5.0]])  # k1 = logp (5.0 is padding)
    rewards, m = apply_kl_penalty_to_reward(scores, logp, ref, mask, kl_coef=0.5, kind="k1")
    # rewards = scores - 0.5 * kl * mask
    #   row 0: [0 - 0.05, 0 - 0.1, 1 - 0.15]; row 1: [0 - 0.2, 2 + 0.1, 0 (padding untouched)]
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.1, 0.85], [-0.2, 2.1, 0.0]]))
    # batch KL: row means 0.6/3 = 0.2 and 0.2/2 = 0.1 -> 0.15
    assert m["actor/reward_kl_penalty"].item() == pytest.approx(0.15)
    assert m["actor/reward_kl_penalty_coeff"].item() == pytest.approx(0.5)


def test_adaptive_kl_controller_exact_updates():
    ctrl = AdaptiveKLController(init_kl_coef=0.1, target_kl=6.0, horizon=10000)
    # KL too high: e = clip(9/6 - 1 = 0.5, +-0.2) = 0.2
    #   -> coef * (1 + 0.2 * 256/10000) = 0.1 * 1.00512
    ctrl.update(current_kl=9.0, n_steps=256)
    assert ctrl.value == pytest.approx(0.100512, abs=1e-12)
    # KL too low: e = clip(3/6 - 1 = -0.5) = -0.2
    #   -> * (1 - 0.2 * 256/10000) = 0.100512 * 0.99488
    ctrl.update(current_kl=torch.tensor(3.0), n_steps=256)
    assert ctrl.value == pytest.approx(0.100512 * 0.99488, abs=1e-12)
    # inside the band: e = 6.6/6 - 1 = 0.1 -> * (1 + 0.1 * 100/10000) = * 1.001
    before = ctrl.value
    ctrl.update(6.6, n_steps=100)
    assert ctrl.value == pytest.approx(before * 1.001, abs=1e-12)


def test_fixed_controller_and_factory():
    fixed = make_kl_controller({"type": "fixed", "kl_coef": 0.01})
    assert isinstance(fixed, FixedKLController)
    fixed.update(100.0, n_steps=1000)
    assert fixed.value == 0.01
    ada = make_kl_controller(type="adaptive", kl_coef=0.2, target_kl=1.0, horizon=100)
    assert isinstance(ada, AdaptiveKLController) and ada.value == 0.2
    with pytest.raises(ValueError, match="kl_coef"):
        make_kl_controller({"type": "fixed", "kl_coeff": 0.01})
    with pytest.raises(ValueError, match="target_kl"):
        make_kl_controller(type="adaptive", kl_coef=0.1, horizon=10)
    with pytest.raises(ValueError, match="adaptive"):
        make_kl_controller(type="pid")


def test_value_loss_clipping():
    vpreds = torch.tensor([[1.5, 0.2, 2.0]], requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 1.0]])
    ret = torch.tensor([[2.0, 0.0, 1.0]])
    mask = torch.ones(1, 3)
    loss, m = value_loss(vpreds, old, ret, mask, cliprange_value=0.2)
    #   t0: v_clip = 1.2; (1.5-2)^2 = 0.25, (1.2-2)^2 = 0.64 -> 0.64 (clipped term wins)
    #   t1: v_clip = 0.8; (0.2-0)^2 = 0.04, (0.8-0)^2 = 0.64 -> 0.64 (clipped term wins)
    #   t2: v_clip = 1.2; (2-1)^2   = 1.0,  (1.2-1)^2 = 0.04 -> 1.0
    # loss = 0.5 * (0.64 + 0.64 + 1.0) / 3 = 0.38
    assert loss.item() == pytest.approx(0.38)
    assert m["critic/vf_clipfrac"].item() == pytest.approx(2 / 3)
    loss.backward()
    # gradient only through the unclipped t2: 0.5 * 2 * (2 - 1) / 3 = 1/3
    torch.testing.assert_close(vpreds.grad, torch.tensor([[0.0, 0.0, 1 / 3]]))
    # no clipping: 0.5 * (0.25 + 0.04 + 1.0) / 3 = 0.215
    loss_nc, m_nc = value_loss(vpreds, old, ret, mask, cliprange_value=None)
    assert loss_nc.item() == pytest.approx(0.215)
    assert m_nc["critic/vf_clipfrac"].item() == 0.0


def test_entropy_from_logits_matches_categorical():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 11, generator=gen) * 4
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), expected, atol=1e-5, rtol=1e-5)
    # uniform over 8 -> log 8
    assert entropy_from_logits(torch.zeros(8)).item() == pytest.approx(2.0794415)  # ln 8
