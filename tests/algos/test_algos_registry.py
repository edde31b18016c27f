"""Registry behaviour: lookups, helpful errors, user registration."""
import pytest
import torch

from hybridflow.trainer.algos import (
    ADVANTAGES,
    POLICY_LOSSES,
    Registry,
    RegistryKeyError,
    agg_loss,
    get_advantage,
    get_policy_loss,
    kl_penalty,
    register_advantage,
)


def test_builtin_names():
    assert {"gae", "grpo"} <= set(ADVANTAGES.names())
    assert {"vanilla", "ppo"} <= set(POLICY_LOSSES.names())
    assert get_policy_loss("ppo") is get_policy_loss("vanilla")


def test_unknown_advantage_suggests_nearest():
    with pytest.raises(KeyError) as exc:
        get_advantage("grp")
    msg = str(exc.value)
    assert "'grpo'" in msg and "Did you mean" in msg
    assert "gae" in msg  # lists everything available
    assert not msg.startswith('"')  # plain message, not KeyError's repr


def test_unknown_name_is_also_value_error():
    with pytest.raises(ValueError, match="vanilla"):
        get_policy_loss("vanila")
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")
    assert issubclass(RegistryKeyError, KeyError) and issubclass(RegistryKeyError, ValueError)


def test_user_registers_estimator_and_fetches_it_by_name():
    @register_advantage("test_constant_adv")
    def constant_adv(token_level_rewards, response_mask, *, index=None, values=None, scale=1.0,
                     **cfg):
        adv = scale * response_mask.float()
        return adv, adv

    try:
        fn = get_advantage("test_constant_adv")
        assert fn is constant_adv
        mask = torch.tensor([[1, 1, 0]])
        adv, ret = fn(torch.zeros(1, 3), mask, scale=2.0, unrelated_key=5)
        assert adv.tolist() == [[2.0, 2.0, 0.0]]
        # a typo close to the user's name is suggested too
        with pytest.raises(KeyError, match="test_constant_adv"):
            get_advantage("test_constant_ad")
    finally:
        ADVANTAGES.unregister("test_constant_adv")
    assert "test_constant_adv" not in ADVANTAGES


def test_duplicate_registration_needs_override():
    reg = Registry("thing")
    reg.register("a", lambda: 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", lambda: 2)
    reg.register("a", lambda: 3, override=True)
    assert reg.get("a")() == 3
    assert reg.names() == ["a"] and len(reg) == 1


def test_empty_registry_error_message():
    with pytest.raises(KeyError, match=r"\(none\)"):
        Registry("thing").get("x")


def test_unknown_agg_mode_lists_modes():
    with pytest.raises(ValueError) as exc:
        agg_loss(torch.ones(2, 2), torch.ones(2, 2), "token_mean")
    msg = str(exc.value)
    assert "'token-mean'" in msg  # nearest match
    for mode in ("seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        assert mode in msg
