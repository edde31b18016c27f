"""Bad inputs through a recipe's ``main(argv)``: one clear error naming the cause, raised before
any worker is built when the config alone shows it; reward functions that misbehave at run time
are either tolerated and counted (default) or fail the run with the sample (``reward.strict``)."""
from __future__ import annotations

import pytest

from hybridflow.config import ConfigError
from hybridflow.trainer.rewards import RewardError

from .conftest import read_rows, run_recipe, train_rows

FAST = ("trainer.steps=2", "trainer.val_every=0", "trainer.val_before_train=false")


def fails_early(assets, tmp_path, *extra, recipe="grpo", error=ConfigError):
    """Run with ``extra`` overrides (build_workers patched to refuse, see the no_workers fixture);
    return the message of the expected error."""
    with pytest.raises(error) as info:
        run_recipe(recipe, assets.args(tmp_path / "run", *extra))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    return str(info.value)


@pytest.mark.parametrize("recipe", ["grpo", "ppo"])
def test_unknown_key_suggests_the_right_one(assets, tmp_path, no_workers, recipe):
    msg = fails_early(assets, tmp_path, "actor.lrr=1", recipe=recipe)
    assert "actor.lrr" in msg and "actor.lr" in msg.replace("actor.lrr", "")
    assert not (tmp_path / "run").exists()  # rejected while parsing: not even the run dir was made


def test_bad_value_type_names_the_key(assets, tmp_path, no_workers):
    msg = fails_early(assets, tmp_path, "actor.lr=fast")
    assert "actor.lr" in msg and "fast" in msg


def test_missing_train_file_is_named(assets, tmp_path, no_workers):
    missing = tmp_path / "nowhere" / "train.parquet"
    msg = fails_early(assets, tmp_path, f"data.train={missing}")
    assert "data.train" in msg and str(missing) in msg


def test_missing_val_file_is_named(assets, tmp_path, no_workers):
    missing = tmp_path / "val.parquet"
    msg = fails_early(assets, tmp_path, f"data.val={missing}")
    assert "data.val" in msg and str(missing) in msg


@pytest.mark.parametrize("kind", ["file", "missing", "empty_dir"])
def test_model_path_must_be_a_checkpoint_directory(assets, tmp_path, no_workers, kind):
    path = {"file": assets.train, "missing": str(tmp_path / "no_model"), "empty_dir": str(tmp_path)}[kind]
    msg = fails_early(assets, tmp_path, f"model.path={path}")
    assert "model.path" in msg and path in msg


def test_critic_model_path_is_checked_too(assets, tmp_path, no_workers):
    msg = fails_early(assets, tmp_path, f"critic.model_path={tmp_path}", recipe="ppo")
    assert "critic.model_path" in msg and str(tmp_path) in msg


def test_misspelt_advantage_estimator_suggests_grpo(assets, tmp_path, no_workers):
    msg = fails_early(assets, tmp_path, "algorithm.adv_estimator=grp")
    assert "algorithm.adv_estimator" in msg and "'grpo'" in msg and "Did you mean" in msg


def test_unknown_executor_is_rejected(assets, tmp_path, no_workers):
    msg = fails_early(assets, tmp_path, "executor=rey")
    assert "executor" in msg and "ray" in msg


def test_no_reward_at_all_is_rejected(assets, tmp_path, no_workers):
    msg = fails_early(assets, tmp_path, "reward.function=null")  # and reward.model_path is null
    assert "reward.function" in msg and "reward.model_path" in msg


def test_unknown_rollout_backend_is_rejected(assets, tmp_path, no_workers):
    msg = fails_early(assets, tmp_path, "rollout.backend=vlm")
    assert "rollout.backend" in msg and "vllm" in msg and "static" in msg


def test_reward_file_missing_is_named(assets, tmp_path, no_workers):
    missing = tmp_path / "my_reward.py"
    msg = fails_early(assets, tmp_path, f"reward.function={missing}:score", error=RewardError)
    assert "file not found" in msg and str(missing) in msg


def test_reward_function_not_found_lists_the_file_functions(assets, tmp_path, no_workers):
    msg = fails_early(assets, tmp_path, assets.reward("parity_typo"), error=RewardError)
    assert str(assets.rewards) in msg and "parity_typo" in msg
    for name in ("parity", "flaky", "stringly"):
        assert name in msg


def test_reward_file_with_syntax_error_shows_the_line(assets, tmp_path, no_workers):
    bad = tmp_path / "broken_reward.py"
    bad.write_text("def score(prompt, response, ground_truth):\n    return 1 +\n")
    msg = fails_early(assets, tmp_path, f"reward.function={bad}:score", error=RewardError)
    assert str(bad) in msg and "line 2" in msg


def test_relative_reward_path_is_resolved_for_workers(assets, tmp_path, monkeypatch):
    """``reward.function`` relative to the working directory works (the controller makes it absolute)."""
    monkeypatch.chdir(assets.rewards.parent)
    run = run_recipe("grpo", assets.args(tmp_path, f"reward.function={assets.rewards.name}:parity", *FAST))
    assert run.step == 2
    assert str(run.cfg.reward.function) == f"{assets.rewards}:parity"


def test_reward_that_raises_on_some_samples_is_counted(assets, tmp_path):
    run_recipe("grpo", assets.args(tmp_path, assets.reward("flaky"), *FAST))
    rows = train_rows(tmp_path)
    assert sorted(rows) == [1, 2]
    for row in rows.values():
        failed = row["reward/num_failed"]
        assert 0 < failed < 32  # 8 prompts x 4 samples; flaky raises on even first operands only
        assert row["reward/mean"] == pytest.approx(1.0 - failed / 32)  # failures scored fallback 0.0


def test_strict_reward_fails_naming_function_and_sample(assets, tmp_path):
    with pytest.raises(RewardError) as info:
        run_recipe("grpo", assets.args(tmp_path, assets.reward("flaky"), "reward.strict=true", *FAST))
    msg = str(info.value)
    assert "flaky" in msg and str(assets.rewards) in msg
    assert "prompt=" in msg and "response=" in msg and "ValueError" in msg
    assert "flaky cannot score first operand" in msg
    assert not [r for r in (read_rows(tmp_path) if (tmp_path / "metrics.jsonl").exists() else [])
                if "reward/mean" in r]  # no training step was logged


def test_reward_returning_a_string_gets_the_fallback(assets, tmp_path):
    run_recipe("grpo", assets.args(tmp_path, assets.reward("stringly"), "reward.fallback_score=0.25", *FAST))
    rows = train_rows(tmp_path)
    assert sorted(rows) == [1, 2]
    for row in rows.values():
        assert row["reward/num_failed"] == 32
        assert row["reward/mean"] == pytest.approx(0.25)
