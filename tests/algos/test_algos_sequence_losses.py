"""GSPO and CTPO policy losses: hand-computed values, gradients, masking, length-1 responses."""
import math

import pytest
import torch

import hybridflow.trainer.algos.sequence_losses  # noqa: F401  (registers gspo, ctpo)
from hybridflow.trainer.algos import get_policy_loss

gspo = get_policy_loss("gspo")
ctpo = get_policy_loss("ctpo")
ppo = get_policy_loss("ppo")
e = math.exp


def _rows(deltas, advantages, width):
    """old = 0, log_prob = delta on the masked prefix of each row, garbage (inf/nan) after it."""
    old = torch.zeros(len(deltas), width)
    logp = torch.full((len(deltas), width), float("nan"))
    logp[:, -1] = float("-inf")
    mask = torch.zeros(len(deltas), width)
    for i, row in enumerate(deltas):
        logp[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1.0
    adv = torch.tensor(advantages, dtype=torch.float32).unsqueeze(-1).expand(-1, width).clone()
    return old, logp.requires_grad_(True), adv, mask


def test_registered():
    from hybridflow.trainer.algos import POLICY_LOSSES
    from hybridflow.trainer.algos.sequence_losses import ctpo_loss, gspo_loss

    assert POLICY_LOSSES.get("gspo") is gspo_loss and POLICY_LOSSES.get("ctpo") is ctpo_loss


# ----------------------------------------------------------------------------- GSPO
def test_gspo_sequence_ratio_clip_and_gradient():
    # row 0: log-ratios (0.2, -0.1) -> s = exp(0.05) = 1.051271, A = +1, inside [0.9, 1.2]
    # row 1: one token (length-1 response), log-ratio 0.3 -> s = exp(0.3) = 1.349859 > 1.2, A = +1: clipped
    # row 2: all masked (its log_prob is nan/-inf garbage): takes no part
    old, logp, adv, mask = _rows([[0.2, -0.1], [0.3], []], [1.0, 1.0, 5.0], width=3)
    loss, m = gspo(old, logp, adv, mask, loss_agg_mode="seq-mean-token-mean", clip_ratio_low=0.1, clip_ratio_high=0.2)
    # per row (token mean): row 0: -1.051271; row 1: max(-1.349859, -1.2) = -1.2; mean of 2 rows
    assert loss.item() == pytest.approx((-e(0.05) - 1.2) / 2, abs=1e-6)  # -1.125636
    loss.backward()
    # row 0: d/dlogp_t of -A s_tok / |y| / 2 rows = -1.051271 / 4 on both tokens; row 1 clipped: 0
    expected = torch.tensor([[-e(0.05) / 4, -e(0.05) / 4, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(logp.grad, expected)
    assert m["actor/pg_clipfrac"].item() == pytest.approx(1 / 3)      # 1 of 3 tokens
    assert m["actor/pg_clipfrac_seq"].item() == pytest.approx(1 / 2)  # 1 of 2 non-empty rows
    assert m["actor/seq_ratio_mean"].item() == pytest.approx((e(0.05) + e(0.3)) / 2, abs=1e-6)
    assert m["actor/ppo_kl"].item() == pytest.approx(-(0.2 - 0.1 + 0.3) / 3, abs=1e-6)
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


def test_gspo_negative_advantage_is_pessimistic():
    # A = -1, s = exp(0.3) above 1 + eps_high: max(1.349859, 1.2) keeps the unclipped term (gradient flows)
    old, logp, adv, mask = _rows([[0.3, 0.3]], [-1.0], width=2)
    loss, m = gspo(old, logp, adv, mask, loss_agg_mode="seq-mean-token-mean", clip_ratio_low=0.1, clip_ratio_high=0.2)
    assert loss.item() == pytest.approx(e(0.3), abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.full((1, 2), e(0.3) / 2))
    assert m["actor/pg_clipfrac"].item() == 0.0


def test_gspo_default_clip_is_the_papers_tiny_range():
    # eps = (3e-4, 4e-4): s = exp(0.001) = 1.0010005 > 1.0004 is clipped for A > 0
    old, logp, adv, mask = _rows([[0.001, 0.001]], [1.0], width=2)
    loss, m = gspo(old, logp, adv, mask, loss_agg_mode="seq-mean-token-mean")
    assert loss.item() == pytest.approx(-1.0004, abs=1e-6)
    assert m["actor/pg_clipfrac"].item() == 1.0


def test_gspo_token_form_matches_the_sequence_objective():
    """Value and gradient equal -(1/G) sum_i min(s_i A_i, clip(s_i) A_i) with s_i differentiated
    directly (seq-mean-token-mean, one advantage per response)."""
    torch.manual_seed(0)
    B, R = 6, 7
    old = torch.randn(B, R) * 0.1 - 1.0
    logp = (old + torch.randn(B, R) * 0.05).requires_grad_(True)
    mask = torch.ones(B, R)
    for i, n in enumerate([7, 5, 1, 3, 6, 2]):
        mask[i, n:] = 0
    a = torch.randn(B)
    loss, _ = gspo(old, logp, a[:, None].expand(B, R), mask, loss_agg_mode="seq-mean-token-mean",
                   clip_ratio_low=0.01, clip_ratio_high=0.02)
    loss.backward()
    grad_token_form = logp.grad.clone()

    logp.grad = None
    s = torch.exp(((logp - old) * mask).sum(-1) / mask.sum(-1))
    direct = -torch.minimum(s * a, s.clamp(0.99, 1.02) * a).mean()
    direct.backward()
    assert loss.item() == pytest.approx(direct.item(), abs=1e-6)
    torch.testing.assert_close(grad_token_form, logp.grad)


def test_gspo_length_one_responses_are_ppo_without_dual_clip():
    old, logp, adv, mask = _rows([[0.3], [-0.4], [0.05]], [1.0, -2.0, 0.5], width=1)
    loss, _ = gspo(old, logp, adv, mask, loss_agg_mode="token-mean", clip_ratio_low=0.2, clip_ratio_high=0.2)
    loss.backward()
    grad = logp.grad.clone()
    logp.grad = None
    ref, _ = ppo(old, logp, adv, mask, loss_agg_mode="token-mean", clip_ratio_low=0.2, clip_ratio_high=0.2,
                 clip_ratio_c=100.0)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    torch.testing.assert_close(grad, logp.grad)


def test_gspo_all_masked_batch_gives_zero_not_nan():
    old, logp, adv, mask = _rows([[], []], [1.0, -1.0], width=3)
    loss, m = gspo(old, logp, adv, mask, loss_agg_mode="seq-mean-token-mean")
    assert loss.item() == 0.0 and all(math.isfinite(v.item()) for v in m.values())
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))


# ----------------------------------------------------------------------------- CTPO
def test_ctpo_cumulative_ratio_position_clip_and_gradient():
    # c_low = 0.025, c_high = 0.05, c_dual = 0.05, p = 0.5: bounds at t are [-0.025 sqrt(t), 0.05 sqrt(t)]
    # row 0 (A=+1), log-ratios (0.02, 0.03, 0.1) -> cumulative L = (0.02, 0.05, 0.15)
    #   t=1: 0.02 in [-0.025, 0.05]            l = -exp(0.02)            = -1.020201
    #   t=2: 0.05 in [-0.0354, 0.0707]         l = -exp(0.05)            = -1.051271
    #   t=3: 0.15 > 0.0866 (clipped, A > 0)    l = -exp(0.05 sqrt 3)     = -1.090463   (no gradient)
    # row 1 (A=-1), length 1, L = 0.1 > 0.05: max(1.105171, 1.051271) = 1.105171, dual cap exp(0.05) = 1.051271
    #                                        l = 1.051271 (dual clip, no gradient)
    # row 2 (A=-1), log-ratios (-0.1, 0.0) -> L = (-0.1, -0.1), below the lower bounds: clipped
    #   t=1: l = exp(-0.025) = 0.975310; t=2: l = exp(-0.025 sqrt 2) = 0.965262          (no gradient)
    # row 3: all masked (garbage log-probs)
    old, logp, adv, mask = _rows([[0.02, 0.03, 0.1], [0.1], [-0.1, 0.0], []], [1.0, -1.0, -1.0, 3.0], width=4)
    loss, m = ctpo(old, logp, adv, mask, loss_agg_mode="token-mean")
    terms = [-e(0.02), -e(0.05), -e(0.05 * math.sqrt(3)), e(0.05), e(-0.025), e(-0.025 * math.sqrt(2))]
    assert loss.item() == pytest.approx(sum(terms) / 6, abs=1e-6)  # -0.028349
    loss.backward()
    # the prefix product is a constant weight: token t's gradient is -A rho_t / 6 from its own term only
    expected = torch.zeros(4, 4)
    expected[0, 0], expected[0, 1] = -e(0.02) / 6, -e(0.05) / 6
    torch.testing.assert_close(logp.grad, expected)
    assert m["actor/pg_clipfrac"].item() == pytest.approx(3 / 6)        # row 0 t=3, row 2 both tokens
    assert m["actor/pg_clipfrac_lower"].item() == pytest.approx(1 / 6)  # row 1
    assert m["actor/ppo_kl"].item() == pytest.approx(-(0.02 + 0.03 + 0.1 + 0.1 - 0.1) / 6, abs=1e-6)
    assert m["actor/cum_log_ratio_absmax"].item() == pytest.approx(0.15, abs=1e-6)
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


def test_ctpo_weight_is_the_prefix_product():
    # no clip in reach (huge bounds): the loss of token t is -A prod_{k<=t} ratio_k
    old, logp, adv, mask = _rows([[0.5, -0.2, 0.4]], [2.0], width=3)
    loss, _ = ctpo(old, logp, adv, mask, loss_agg_mode="seq-mean-token-sum", ctpo_log_clip_low=50.0,
                   ctpo_log_clip_high=50.0, ctpo_log_clip_c=None)
    assert loss.item() == pytest.approx(-2.0 * (e(0.5) + e(0.3) + e(0.7)), abs=1e-5)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2 * e(0.5), -2 * e(0.3), -2 * e(0.7)]]))


def test_ctpo_length_one_responses_are_ppo_with_log_bounds():
    # p = 0 and bounds log(1.2) / -log(0.8) / log(3): on one-token responses this is PPO-clip 0.2, dual-clip 3
    old, logp, adv, mask = _rows([[0.3], [-0.4], [0.05], [1.5]], [1.0, -2.0, 0.5, -1.0], width=1)
    loss, m = ctpo(old, logp, adv, mask, loss_agg_mode="token-mean", ctpo_log_clip_low=-math.log(0.8),
                   ctpo_log_clip_high=math.log(1.2), ctpo_log_clip_c=math.log(3.0), ctpo_clip_power=0.0)
    loss.backward()
    grad = logp.grad.clone()
    logp.grad = None
    ref, ref_m = ppo(old, logp, adv, mask, loss_agg_mode="token-mean", clip_ratio_low=0.2, clip_ratio_high=0.2,
                     clip_ratio_c=3.0)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    torch.testing.assert_close(grad, logp.grad)
    assert m["actor/pg_clipfrac_lower"].item() == pytest.approx(ref_m["actor/pg_clipfrac_lower"].item())


def test_ctpo_all_masked_batch_and_bad_options():
    old, logp, adv, mask = _rows([[], []], [1.0, -1.0], width=3)
    loss, m = ctpo(old, logp, adv, mask, loss_agg_mode="token-mean")
    assert loss.item() == 0.0 and all(math.isfinite(v.item()) for v in m.values())
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))
    with pytest.raises(ValueError, match="log-space clip bounds"):
        ctpo(old, logp, adv, mask, ctpo_log_clip_low=0.0)
    with pytest.raises(ValueError, match="ctpo_log_clip_c"):
        ctpo(old, logp, adv, mask, ctpo_log_clip_c=-1.0)


@pytest.mark.parametrize("name", ["gspo", "ctpo"])
def test_unknown_config_keys_are_ignored(name):
    """The actor passes its whole config section as keyword arguments."""
    old, logp, adv, mask = _rows([[0.01, 0.02]], [1.0], width=2)
    loss, _ = get_policy_loss(name)(old, logp, adv, mask, loss_agg_mode="token-mean", lr=1e-3, policy_loss=name,
                                    clip_ratio_c=3.0, entropy_coeff=0.0, norm_constant=None)
    assert math.isfinite(loss.item())
