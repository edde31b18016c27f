"""Resuming from a checkpoint reproduces the uninterrupted run, step for step.

Run A trains 4 steps without interruption. Run B is interrupted after step 3 was logged (the last
checkpoint is step 2), or stopped at step 2 and extended, then resumed with ``trainer.resume=auto``
in the same run dir. Steps 3 and 4 of B must equal A's: same prompts (data order), same samples
(per-step seeds), same weights and optimizer moments (actor, and critic for PPO), same KL
coefficient. The reward is ``parity`` (about half the samples of the random model score 1), so
advantages, gradients and KL are non-zero and the comparison is not vacuous."""
from __future__ import annotations

import json

import pytest

from hybridflow.config import ConfigError
from hybridflow.trainer.run import RLRun

from .conftest import comparable, read_rows, run_recipe, train_rows

KEY_METRICS = ("reward/mean", "actor/pg_loss", "response_length/mean", "actor/grad_norm", "actor/kl_ref",
               "actor/entropy", "advantages/max", "throughput/total_tokens")


class Interrupted(Exception):
    pass


def interrupt_after(monkeypatch, step: int) -> None:
    """Make RLRun.end_step raise once step ``step`` has been logged (a crash mid-run)."""
    original = RLRun.end_step

    def end_step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.step == step:
            raise Interrupted(f"simulated crash after step {step}")
        return out

    monkeypatch.setattr(RLRun, "end_step", end_step)


def assert_rows_equal(got: dict, want: dict, step: int) -> None:
    got, want = comparable(got), comparable(want)
    assert set(got) == set(want), f"step {step}: metric keys differ: {set(got) ^ set(want)}"
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-6), \
            f"step {step}: {key} is {got[key]} after resume, {value} uninterrupted"


def checkpoints(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def steps_logged(run_dir) -> list[int]:
    return [r["step"] for r in read_rows(run_dir)]


@pytest.fixture(scope="module")
def grpo_uninterrupted(assets, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("grpo_A")
    run_recipe("grpo", assets.args(run_dir, assets.reward("parity"), "trainer.save_every=2", "trainer.keep_last=1"))
    return run_dir


@pytest.mark.parametrize("how", ["crash_after_step_3", "stop_at_step_2_then_extend"])
def test_grpo_resume_equals_uninterrupted(assets, grpo_uninterrupted, tmp_path, monkeypatch, how):
    common = (assets.reward("parity"), "trainer.save_every=2", "trainer.keep_last=1")
    with monkeypatch.context() as patch:
        if how == "crash_after_step_3":
            interrupt_after(patch, 3)
            with pytest.raises(Interrupted):
                run_recipe("grpo", assets.args(tmp_path, *common))
            assert steps_logged(tmp_path)[-1] == 3  # step 3 was logged, its checkpoint never made
        else:
            run_recipe("grpo", assets.args(tmp_path, *common, "trainer.steps=2"))
    assert checkpoints(tmp_path) == ["step_2"]

    run = run_recipe("grpo", assets.args(tmp_path, *common, "trainer.resume=auto"))
    assert run.step == 4

    want, got = train_rows(grpo_uninterrupted), train_rows(tmp_path)
    assert sorted(want) == sorted(got) == [1, 2, 3, 4]
    # the comparison means something: by step 3 the actor has moved away from the reference
    assert want[3]["actor/grad_norm"] > 0 and want[3]["actor/kl_ref"] != 0 and want[3]["actor/kl_loss"] > 0
    for step in (3, 4):
        for key in KEY_METRICS + ("actor/kl_loss",):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-6, abs=1e-6), \
                f"step {step}: {key} is {got[step][key]} after resume, {want[step][key]} uninterrupted"
        assert_rows_equal(got[step], want[step], step)

    # metrics.jsonl: every step once, in order (the repeated step 3 replaced, not duplicated);
    # val rows at 0 (before training), 2 and 4 equal A's too
    assert steps_logged(tmp_path) == steps_logged(grpo_uninterrupted) == [0, 1, 2, 3, 4]
    for row_b, row_a in zip(read_rows(tmp_path), read_rows(grpo_uninterrupted)):
        assert_rows_equal(row_b, row_a, row_a["step"])
    # keep_last=1: only the newest checkpoint survives, and it is complete
    assert checkpoints(tmp_path) == checkpoints(grpo_uninterrupted) == ["step_4"]
    state = json.loads((tmp_path / "checkpoints" / "step_4" / "controller.json").read_text())
    assert state["step"] == 4


def test_ppo_resume_restores_critic_and_kl_controller(assets, tmp_path_factory, monkeypatch):
    common = (assets.reward("parity"), "trainer.save_every=2", "trainer.keep_last=2",
              "algorithm.kl_ctrl.type=adaptive", "algorithm.kl_ctrl.kl_coef=0.05", "algorithm.kl_ctrl.horizon=100")
    run_a, run_b = tmp_path_factory.mktemp("ppo_A"), tmp_path_factory.mktemp("ppo_B")
    run_recipe("ppo", assets.args(run_a, *common))
    with monkeypatch.context() as patch:
        interrupt_after(patch, 3)
        with pytest.raises(Interrupted):
            run_recipe("ppo", assets.args(run_b, *common))
    run = run_recipe("ppo", assets.args(run_b, *common, "trainer.resume=auto"))
    assert run.step == 4

    want, got = train_rows(run_a), train_rows(run_b)
    assert sorted(got) == [1, 2, 3, 4]
    assert want[3]["critic/vf_loss"] > 0 and want[3]["values/mean"] != 0
    for step in (3, 4):
        for key in ("values/mean", "critic/vf_loss", "returns/mean", "advantages/mean", "actor/reward_kl_penalty",
                    "actor/pg_loss", "reward/rewards_mean", "critic/grad_norm", "actor/reward_kl_penalty_coeff"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-6, abs=1e-6), \
                f"step {step}: {key} is {got[step][key]} after resume, {want[step][key]} uninterrupted"
        assert_rows_equal(got[step], want[step], step)
    assert steps_logged(run_b) == [0, 1, 2, 3, 4]
    assert checkpoints(run_b) == ["step_2", "step_4"]
    for name in ("actor", "critic"):
        assert (run_b / "checkpoints" / "step_4" / name).is_dir()
    kl_a = json.loads((run_a / "checkpoints" / "step_4" / "controller.json").read_text())["kl_coef"]
    kl_b = json.loads((run_b / "checkpoints" / "step_4" / "controller.json").read_text())["kl_coef"]
    assert kl_a != 0.05 and kl_b == pytest.approx(kl_a, rel=1e-9)  # adaptive: it moved, and was restored


@pytest.mark.parametrize("resume", ["does/not/exist/step_2", "{run_dir}"])
def test_resume_from_a_bad_path_fails_before_workers(assets, tmp_path, no_workers, resume):
    path = resume.format(run_dir=tmp_path)
    with pytest.raises((ConfigError, FileNotFoundError, ValueError)) as info:
        run_recipe("grpo", assets.args(tmp_path, f"trainer.resume={path}"))
    assert path in str(info.value) and "resume" in str(info.value)
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.lora
def test_lora_ppo_resume_restores_the_adapters(assets, tmp_path_factory, monkeypatch):
    """LoRA on actor and critic (the actor, adapters off, is the KL reference): a resumed run equals
    the uninterrupted one, and the checkpoint holds each model once (no separate reference)."""
    common = (assets.reward("parity"), "trainer.save_every=2", "trainer.keep_last=1", "actor.lora.rank=4",
              "critic.lora.rank=4", "actor.lr=5e-3", "critic.lr=5e-3")
    run_a, run_b = tmp_path_factory.mktemp("lora_A"), tmp_path_factory.mktemp("lora_B")
    first = run_recipe("ppo", assets.args(run_a, *common))
    assert first.groups["ref"] is first.groups["actor"]
    with monkeypatch.context() as patch:
        interrupt_after(patch, 3)
        with pytest.raises(Interrupted):
            run_recipe("ppo", assets.args(run_b, *common))
    assert run_recipe("ppo", assets.args(run_b, *common, "trainer.resume=auto")).step == 4
    want, got = train_rows(run_a), train_rows(run_b)
    assert want[3]["actor/grad_norm"] > 0 and want[3]["actor/reward_kl_penalty"] != 0  # the adapters moved off the base
    for step in (3, 4):
        assert_rows_equal(got[step], want[step], step)
    assert sorted(p.name for p in (run_b / "checkpoints" / "step_4").iterdir() if p.is_dir()) == ["actor", "critic"]
