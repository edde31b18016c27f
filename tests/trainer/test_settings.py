"""Typed settings (trainer/settings.py, hybridflow/config.py ``bind``): the YAML resolved once on the
controller into one dataclass per role, with errors that name the key; each worker gets its part."""
from __future__ import annotations

import dataclasses
import textwrap
import typing
from pathlib import Path

import pytest

from hybridflow.config import ConfigError, bind, collect, load_config, parse_cli
from hybridflow.trainer import settings as S

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"


@pytest.fixture(scope="module")
def run_files(tiny_ckpt, tmp_path_factory):
    """A checkpoint and data that exist, for the checks that open files."""
    from hybridflow.trainer.tasks import make_reverse_data

    data = make_reverse_data(tmp_path_factory.mktemp("settings_data"), n_train=8, n_val=4, n_sft=4)
    return [f"model.path={tiny_ckpt}", f"data.train={data['train']}", f"data.val={data['val']}"]


def grpo(run_files, *overrides, recipe="grpo"):
    return S.rl_settings(load_config(str(RECIPES / f"{recipe}.yaml"), [*run_files, *overrides]))


# ------------------------------------------------------------------ bind
@dataclasses.dataclass(frozen=True, kw_only=True)
class Inner:
    kind: S.Literal["a", "b"]
    size: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Outer:
    lr: float
    steps: int
    on: bool
    name: str
    tags: list
    maybe: S.Optional[int]
    inner: Inner
    rest: dict = collect()


def test_bind_converts_types_and_collects_the_rest():
    out = bind(Outer, {"lr": "1e-5", "steps": 3.0, "on": "yes", "name": 12, "tags": ["x"], "maybe": None,
                       "inner": {"kind": "b", "size": 2}, "extra": {"k": 1}})
    assert out == Outer(lr=1e-5, steps=3, on=True, name="12", tags=["x"], maybe=None, inner=Inner(kind="b", size=2),
                        rest={"extra": {"k": 1}})


@pytest.mark.parametrize("node, pattern", [
    ({"lr": "fast"}, r"config key 'lr': 'fast' is not a valid float"),
    ({"steps": 2.5}, r"config key 'steps': 2.5 is not a valid int"),
    ({"on": "maybe"}, r"config key 'on': 'maybe' is not a valid bool"),
    ({"lr": True}, r"config key 'lr': True is not a valid float"),
    ({"inner": {"kind": "c", "size": 1}}, r"config key 'inner.kind': 'c' is not one of \['a', 'b'\]"),
    ({"inner": {"kind": "a", "size": 1, "sise": 2}}, r"unknown config key 'inner.sise'.*Did you mean: inner.size"),
    ({"inner": {"kind": "a"}}, r"config key 'inner.size' is missing"),
    ({"inner": 3}, r"config key 'inner' must be a section"),
    ({"tags": "x"}, r"config key 'tags': 'x' is not a list"),
    ({"steps": None}, r"config key 'steps' cannot be null"),
])
def test_bind_errors_name_the_key(node, pattern):
    good = {"lr": 1.0, "steps": 1, "on": True, "name": "n", "tags": [], "maybe": 1, "inner": {"kind": "a", "size": 1}}
    for key, value in node.items():
        good[key] = value
    with pytest.raises(ConfigError, match=pattern):
        bind(Outer, good)


def test_a_class_without_collect_refuses_unknown_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'kindd'.*Did you mean: kind"):
        bind(Inner, {"kind": "a", "size": 1, "kindd": 2})


# ------------------------------------------------------------------ the recipes' YAMLs
@pytest.mark.parametrize("recipe", ["grpo", "ppo", "remax", "dapo", "safe_rlhf", "rloo", "reinforce_pp", "dr_grpo",
                                    "gspo", "ctpo", "ppo_rm"])
def test_every_rl_yaml_is_complete_and_known(recipe):
    """Each key of the YAML is a field and each field has its value in the YAML (one place for a default)."""
    s = S.typed_rl_settings(load_config(str(RECIPES / f"{recipe}.yaml")))
    assert s.actor.engine_options == {} and s.sections == {}


def test_sft_and_reward_model_yamls_bind():
    assert S.sft_settings(load_config(str(RECIPES / "sft.yaml"))).optim.lr == 1e-3
    assert S.bind(S.RewardModelSettings, load_config(str(RECIPES / "reward_model.yaml"))).rm.loss == "bradley_terry"


def test_a_file_without_defaults_names_the_missing_key(tmp_path):
    own = tmp_path / "own.yaml"
    own.write_text("executor: inprocess\n")
    with pytest.raises(ConfigError, match=r"config key 'world_size' is missing.*defaults: \[grpo.yaml\]"):
        S.typed_rl_settings(load_config(str(own)))


def test_the_contract_names_match_the_workers():
    from hybridflow.workers.roles.common import BACKENDS
    from hybridflow.workers.rollout import ROLLOUT_BACKENDS

    hints = typing.get_type_hints(S.RolloutSettings), typing.get_type_hints(S.TrainSettings)
    assert set(S.ROLLOUT_BACKENDS) == set(ROLLOUT_BACKENDS) == set(typing.get_args(hints[0]["backend"]))
    assert set(S.TRAIN_BACKENDS) == set(BACKENDS) == set(typing.get_args(hints[1]["backend"]))


# ------------------------------------------------------------------ rl_settings: checks and resolution
def test_misspelt_key_in_a_config_file_fails_with_the_nearest_key(tmp_path, run_files):
    """A typo inside a --config YAML fails like one on the command line, before anything starts."""
    mine = tmp_path / "mine.yaml"
    mine.write_text(textwrap.dedent(f"""\
        defaults: [{RECIPES / 'grpo.yaml'}]
        rollout:
          vllm:
            kv_cache_gb: 2
        """))
    with pytest.raises(ConfigError, match=r"unknown config key 'rollout.vllm.kv_cache_gb' .*mine.yaml.*"
                                          r"Did you mean: rollout.vllm.kv_cache_gib"):
        parse_cli(["--config", str(mine), *run_files], str(RECIPES / "grpo.yaml"))


def test_wrong_type_in_a_config_file_names_the_key(tmp_path, run_files):
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"defaults: [{RECIPES / 'grpo.yaml'}]\nactor:\n  ppo_epochs: two\n")
    cfg = parse_cli(["--config", str(mine), *run_files], str(RECIPES / "grpo.yaml"))
    with pytest.raises(ConfigError, match=r"config key 'actor.ppo_epochs': 'two' is not a valid int"):
        S.rl_settings(cfg)


def test_an_estimator_option_it_does_not_take_fails(run_files):
    """A verl user's norm_adv_by_std_in_grpo is refused with the nearest name, not silently dropped."""
    with pytest.raises(ConfigError, match=r"'algorithm.norm_adv_by_std_in_grpo'.*Did you mean: algorithm.norm_adv_by_std"):
        grpo(run_files, "+algorithm.norm_adv_by_std_in_grpo=false")
    assert grpo(run_files, "+algorithm.epsilon=1e-4").algorithm.estimator_options()["epsilon"] == 1e-4


def test_a_policy_loss_argument_it_does_not_take_fails(run_files):
    with pytest.raises(ConfigError, match=r"'actor.policy_loss_args.ctpo_log_clip_lo'.*ctpo_log_clip_low"):
        grpo(run_files, recipe="ctpo", *["+actor.policy_loss_args.ctpo_log_clip_lo=0.1"])
    assert grpo(run_files, recipe="ctpo").actor.loss_options()["ctpo_log_clip_low"] == 0.025


def test_registry_names_fail_with_the_key_and_the_nearest_name(run_files):
    with pytest.raises(ConfigError, match=r"config key 'actor.policy_loss': unknown policy loss 'gpso'.*'gspo'"):
        grpo(run_files, "actor.policy_loss=gpso")
    with pytest.raises(ConfigError, match=r"config key 'actor.loss_agg_mode'"):
        grpo(run_files, "actor.loss_agg_mode=token-men")


def test_engine_keys_added_with_plus_go_to_the_engine(run_files):
    s = grpo(run_files, "+actor.forward_micro_batch_size=64", "+actor.megatron.overlap_grad_reduce=true")
    assert s.actor.engine_options == {"forward_micro_batch_size": 64} and s.actor.megatron.options == {
        "overlap_grad_reduce": True}
    from hybridflow.workers.roles.common import check_engine_options, engine_values

    backend, values = engine_values(s.actor)
    assert backend == "fsdp" and values["forward_micro_batch_size"] == 64 and values["lr"] == s.actor.lr
    check_engine_options(s.actor, "actor")
    with pytest.raises(ConfigError, match=r"'actor.forward_micro_batch_sise'.*Did you mean: actor.forward_micro_batch_size"):
        check_engine_options(grpo(run_files, "+actor.forward_micro_batch_sise=64").actor, "actor")


def test_resolution_never_changes_the_config(run_files, tmp_path, monkeypatch):
    """Paths become absolute in the settings (workers may run elsewhere); the config stays as given."""
    reward = tmp_path / "my_reward.py"
    reward.write_text("def score(prompt, response, ground_truth, **extra):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(RECIPES / "grpo.yaml"), [*run_files, "reward.function=my_reward.py:score"])
    before = cfg.copy()
    s = S.rl_settings(cfg)
    assert cfg == before and cfg.reward.function == "my_reward.py:score"
    assert s.reward.function == f"{reward}:score"
    assert s.rollout.vllm.max_model_len == s.data.max_prompt_length + s.rollout.max_new_tokens
    assert s.rollout.vllm.cache_dir == str(Path(s.trainer.run_dir).absolute() / "vllm_cache")


def test_a_loss_registered_in_a_script_reaches_workers_by_its_file(run_files, tmp_path, clean_registries):
    """The workers of another process get the spec of the file that registered the loss."""
    import runpy

    from hybridflow.trainer.algos import POLICY_LOSSES

    script = tmp_path / "my_algo.py"
    script.write_text(textwrap.dedent("""\
        from hybridflow.trainer.algos import register_policy_loss, get_policy_loss

        @register_policy_loss("my_ppo")
        def my_ppo(old_log_prob, log_prob, advantages, response_mask, *, clip_ratio_low=0.2, scale=1.0, **cfg):
            return get_policy_loss("ppo")(old_log_prob, log_prob, advantages, response_mask, **cfg)
        """))
    runpy.run_path(str(script))
    s = grpo(run_files, "actor.policy_loss=my_ppo", "+actor.policy_loss_args.scale=2.0")
    assert s.actor.policy_loss == f"{script}:my_ppo"
    assert POLICY_LOSSES.resolve(s.actor.policy_loss) is POLICY_LOSSES.get("my_ppo")  # same process: no reload
    assert grpo(run_files, "actor.policy_loss=ppo").actor.policy_loss == "ppo"  # built-ins keep their name
    with pytest.raises(ConfigError, match=r"'actor.policy_loss_args.sacle'.*Did you mean: actor.policy_loss_args.scale"):
        grpo(run_files, "actor.policy_loss=my_ppo", "+actor.policy_loss_args.sacle=2.0")


def test_workers_get_only_their_part(run_files):
    from hybridflow.workers.roles.actor import ActorWorker
    from hybridflow.workers.roles.critic import CriticWorker
    from hybridflow.workers.roles.reference import ReferenceWorker
    from hybridflow.workers.roles.reward import RewardWorker

    s = grpo(run_files, "actor.ppo_mini_batch_size=64", "data.batch_size=8", "rollout.n=16", "trainer.steps=5")
    actor = ActorWorker.role(s)
    assert actor.args == (s.actor, s.rollout)
    assert actor.kwargs == {"model_path": s.model.path, "total_steps": 5 * 2, "seed": s.seed}  # 128 rows / 64
    assert CriticWorker.role(s).args == (s.critic,) and RewardWorker.role(s).args == (s.reward,)
    ref = ReferenceWorker.role(s)
    assert ref.args[0].lr == s.actor.lr and ref.args[0].micro_batch_size == s.actor.micro_batch_size
    assert ref.kwargs["temperature"] == s.rollout.temperature
    s = grpo(run_files, "+ref.micro_batch_size=16", "+ref.forward_micro_batch_size=8", "+actor.dtype=bf16")
    engine = ReferenceWorker.role(s).args[0]  # keys added to ref override the actor's, for the reference only
    assert (engine.micro_batch_size, engine.engine_options, engine.dtype) == (16, {"forward_micro_batch_size": 8}, "bf16")
    assert s.actor.micro_batch_size == 128
    assert s.needs_reference and not grpo(run_files, "actor.use_kl_loss=false").needs_reference


def test_safe_rlhf_cost_sections_start_from_reward_and_critic(run_files):
    s = grpo(run_files, "critic.grad_clip=0.5", recipe="safe_rlhf")
    assert s.cost.function == "builtin:foreign_digit" and s.cost.fallback_score == s.reward.fallback_score
    assert s.cost_critic.grad_clip == 0.5 and s.cost_critic.cliprange_value == 0.5
    assert s.algorithm.section("lagrange")["threshold"] == 0.2


@pytest.mark.parametrize("overrides, expected", [
    ((), "update"),                                                   # 32 × 8 rows, one mini-batch of 256, one epoch
    (("actor.ppo_epochs=2",), "recompute"),                           # the second epoch is off-policy
    (("actor.ppo_mini_batch_size=128",), "recompute"),                # two optimizer steps per batch
    (("algorithm.use_kl_in_reward=true",), "recompute"),              # the reward reads π_old before the update
    (("actor.rollout_is=true",), "recompute"),                        # so do the IS weights
    (("actor.old_log_prob=recompute",), "recompute"),
    (("actor.old_log_prob=rollout", "actor.ppo_epochs=2"), "rollout"),
])
def test_old_log_prob_auto_picks_the_update_only_where_it_is_exact(run_files, overrides, expected):
    assert grpo(run_files, *overrides).actor.old_log_prob == expected


@pytest.mark.parametrize("overrides, pattern", [
    (("actor.old_log_prob=update", "actor.ppo_epochs=2"), "exactly one optimizer step"),
    (("actor.old_log_prob=update", "algorithm.use_kl_in_reward=true"), "use_kl_in_reward reads π_old"),
    (("actor.old_log_prob=rollout", "actor.rollout_is=true"), "rollout_is needs the recomputed"),
])
def test_old_log_prob_refuses_a_source_that_would_be_wrong(run_files, overrides, pattern):
    with pytest.raises(ConfigError, match=f"actor.old_log_prob=.*{pattern}"):
        grpo(run_files, *overrides)


# ------------------------------------------------------------------ LoRA
@pytest.mark.parametrize("overrides, expected", [
    (("actor.lora.rank=8",), True),                                # the actor's base is the reference
    (("actor.lora.rank=8", "ref.adapters_off=false"), False),      # a separate reference worker
    (("actor.lora.rank=8", "+ref.dtype=bf16"), False),             # the reference differs from the base
    ((), False),                                                   # full fine-tuning: a frozen copy
])
def test_the_lora_actor_serves_the_reference_only_when_it_is_the_same_model(run_files, overrides, expected):
    s = grpo(run_files, *overrides)
    assert s.reference_from_actor is expected
    assert s.needs_reference  # grpo's KL loss reads it either way


def test_lora_keys_reach_the_engine_and_the_reference_stays_full(run_files):
    from hybridflow.workers.roles.common import engine_values

    s = grpo(run_files, "actor.lora.rank=8", "actor.lora.alpha=32", "actor.lora.target_modules=[q_proj,v_proj]")
    _, values = engine_values(s.actor)
    assert (values["lora_rank"], values["lora_alpha"], list(values["lora_target_modules"])) == (8, 32.0, ["q_proj", "v_proj"])
    assert "lora_rank" not in engine_values(s.reference_engine())[1]
    assert "lora_rank" not in engine_values(grpo(run_files).actor)[1]  # rank 0: the engine's own default


@pytest.mark.parametrize("overrides, pattern", [
    (("actor.lora.rank=8", "actor.backend=megatron"), r"actor.lora.rank=8: the megatron engine has no LoRA"),
    (("critic.lora.rank=4", "critic.backend=megatron"), r"critic.lora.rank=4: the megatron engine"),
    (("actor.lora.rank=-1",), r"actor.lora: rank must be >= 0"),
    (("actor.lora.rank=8", "actor.lora.dropout=1.5"), r"actor.lora: .*dropout"),
    (("actor.lora.rank=8", "rollout.backend=static", "rollout.static.weights=copy"), r"rollout.static.weights=copy"),
    (("rollout.backend=vllm", "rollout.vllm.lora=adapter"), r"rollout.vllm.lora=adapter loads the actor's LoRA"),
    (("actor.lora.rank=8", "rollout.vllm.lora=both"), r"rollout.vllm.lora"),
])
def test_lora_settings_that_cannot_work_fail_with_the_key(run_files, overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        grpo(run_files, *overrides, recipe="ppo" if overrides[0].startswith("critic") else "grpo")


def test_lora_without_peft_says_how_to_install_it(run_files, monkeypatch):
    real = S.importlib.util.find_spec
    monkeypatch.setattr(S.importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(ConfigError, match=r"actor.lora.rank=8 needs the peft library: pip install -e '.\[lora\]'"):
        grpo(run_files, "actor.lora.rank=8")
    assert grpo(run_files).actor.lora.rank == 0  # no LoRA: no peft needed


def test_sft_and_reward_model_take_lora(tiny_ckpt):
    sft = S.sft_settings(load_config(str(RECIPES / "sft.yaml"), ["optim.lora.rank=4"]))
    assert sft.optim.uses_lora
    with pytest.raises(ConfigError, match="optim.lora.rank=4: the megatron engine"):
        S.reward_model_settings(load_config(str(RECIPES / "reward_model.yaml"), ["optim.lora.rank=4", "optim.backend=megatron"]))
