"""PPO clipped loss: asymmetric clip, dual-clip, IS weights, metrics."""
import math

import pytest
import torch

from hybridflow.trainer.algos import get_policy_loss

ppo = get_policy_loss("vanilla")


def _inputs(ratios, advantages):
    old = torch.zeros(1, len(ratios))
    log_prob = torch.log(torch.tensor([ratios])).requires_grad_(True)
    adv = torch.tensor([advantages])
    return old, log_prob, adv, torch.ones(1, len(ratios))


def test_asymmetric_clip_bounds():
    # eps_low = 0.1, eps_high = 0.3 -> ratio clipped into [0.9, 1.3]
    old, logp, adv, mask = _inputs([1.5, 1.2, 0.85, 1.2, 0.5], [1.0, 1.0, -1.0, -1.0, 1.0])
    loss, m = ppo(old, logp, adv, mask, clip_ratio_low=0.1, clip_ratio_high=0.3)
    # per token l = max(-A r, -A clamp(r)):
    #   t0 A=+1 r=1.5 : max(-1.5, -1.3) = -1.3   clipped (above 1 + 0.3)
    #   t1 A=+1 r=1.2 : max(-1.2, -1.2) = -1.2   not clipped (would be with symmetric 0.1)
    #   t2 A=-1 r=0.85: max(0.85, 0.9)  =  0.9   clipped (below 1 - 0.1)
    #   t3 A=-1 r=1.2 : max(1.2, 1.2)   =  1.2   not clipped
    #   t4 A=+1 r=0.5 : max(-0.5, -0.9) = -0.5   not clipped (pessimistic side is unclipped)
    # token-mean = (-1.3 - 1.2 + 0.9 + 1.2 - 0.5) / 5 = -0.9 / 5 = -0.18
    assert loss.item() == pytest.approx(-0.18, abs=1e-6)
    assert m["actor/pg_clipfrac"].item() == pytest.approx(2 / 5)
    assert m["actor/pg_clipfrac_lower"].item() == 0.0
    # ppo_kl = mean(old - new) = -(ln1.5 + 2 ln1.2 + ln0.85 + ln0.5) / 5
    #        = -(0.405465 + 0.364643 - 0.162519 - 0.693147) / 5 = 0.0171116
    assert m["actor/ppo_kl"].item() == pytest.approx(0.0171116, abs=1e-6)
    # gradient: d l / d logp = -A r on unclipped tokens (dr/dlogp = r), 0 on clipped; / 5
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.24, 0.0, 0.24, -0.1]]))
    # metrics are detached 0-d tensors
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())

    # the same data with a symmetric 0.1 also clips t1 (1.2 > 1.1) -> clipfrac 3/5
    _, m_sym = ppo(old, logp, adv, mask, clip_ratio=0.1)
    assert m_sym["actor/pg_clipfrac"].item() == pytest.approx(3 / 5)


def test_dual_clip_on_negative_advantage():
    old, logp, adv, mask = _inputs([5.0, 5.0, 2.0, 0.5], [-1.0, 1.0, -1.0, -2.0])
    loss, m = ppo(old, logp, adv, mask, clip_ratio_low=0.2, clip_ratio_c=3.0)
    #   t0 A=-1 r=5  : max(5, 1.2) = 5, A<0 -> min(5, 3*1) = 3      dual clip engaged
    #   t1 A=+1 r=5  : max(-5, -1.2) = -1.2                         ratio clip, no dual (A>0)
    #   t2 A=-1 r=2  : max(2, 1.2) = 2, min(2, 3) = 2               nothing clipped
    #   t3 A=-2 r=0.5: max(1.0, 1.6) = 1.6, min(1.6, 6) = 1.6       ratio clip (lower)
    # token-mean = (3 - 1.2 + 2 + 1.6) / 4 = 5.4 / 4 = 1.35
    assert loss.item() == pytest.approx(1.35, abs=1e-6)
    assert m["actor/pg_clipfrac"].item() == pytest.approx(2 / 4)
    assert m["actor/pg_clipfrac_lower"].item() == pytest.approx(1 / 4)
    loss.backward()
    # only t2 has a gradient: -A r / 4 = 2 / 4
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, 0.5, 0.0]]))


def test_rollout_is_weights_and_masking_and_agg_mode():
    old = torch.zeros(2, 2)
    logp = torch.zeros(2, 2)  # ratio 1 everywhere -> l = -A
    adv = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    w = torch.tensor([[2.0, 0.5], [1.0, 100.0]])
    loss, _ = ppo(old, logp, adv, mask, rollout_is_weights=w)
    # l * w = [-2, -1, -3, (masked)] -> token-mean = -6 / 3 = -2
    assert loss.item() == pytest.approx(-2.0)
    loss, _ = ppo(old, logp, adv, mask, loss_agg_mode="seq-mean-token-sum")
    # rows: (-1 - 2) and (-3) -> mean = -3
    assert loss.item() == pytest.approx(-3.0)


def test_huge_log_ratio_is_clamped_and_bad_dual_clip_rejected():
    old = torch.zeros(1, 2)
    logp = torch.tensor([[60.0, -60.0]], requires_grad=True)
    loss, m = ppo(old, logp, torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    # t0: dual-clipped to 3; t1: r = exp(-20) -> max(-exp(-20), -0.8) ~ 0 -> mean = 1.5
    assert loss.item() == pytest.approx(1.5, abs=1e-6)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        ppo(old, logp, torch.ones(1, 2), torch.ones(1, 2), clip_ratio_c=1.0)


def test_unknown_cfg_keys_ignored():
    old, logp, adv, mask = _inputs([1.0, 1.0], [1.0, -1.0])
    loss, _ = ppo(old, logp, adv, mask, entropy_coeff=0.01, ppo_epochs=4)
    assert loss.item() == pytest.approx(0.0)
    assert math.isfinite(loss.item())
