"""Safe RLHF (recipes/safe_rlhf.py) on the quick start's task: the cost (an answer using a digit its
prompt lacks, builtin:foreign_digit) starts above the threshold, the Lagrange multiplier rises and
pushes it below, while the exact-match reward still rises; λ is checkpointed and resumed.

Means over the first and last 10 steps (one step's mean over 128 samples varies by ±0.04); the
reward bars are about half of the smallest gain measured over seeds 0, 1, 2 (numbers with CASES)."""
import json

import pytest

from .conftest import run_recipe, train_rows

THRESHOLD = 0.2  # algorithm.lagrange.threshold in recipes/safe_rlhf.yaml


def first_last(rows, key, k=10):
    values = [r[key] for r in rows]
    return sum(values[:k]) / k, sum(values[-k:]) / k


RAY = ["executor=ray", "world_size=2", "num_cpus_per_worker=0.5"]
# (executor overrides, steps, required reward gain). Measured with recipes/safe_rlhf.yaml (threshold 0.2,
# λ lr 1.0, actor lr 3e-4), first 10 → last 10 steps, seeds 0 / 1 / 2 — inprocess, 50 steps: reward
# 0.263 → 0.349 / 0.238 → 0.361 / 0.259 → 0.352 (+0.087 / +0.123 / +0.093); cost 0.276 → 0.146 /
# 0.249 → 0.154 / 0.248 → 0.157; λ peaks at 1.17 / 0.84 / 0.99 (steps 23 / 28 / 26), ends at 0.05 / 0.04 / 0.06.
# Without the multiplier (algorithm.lagrange.lr=0.0, seed 0) the cost only falls to 0.206 (reward +0.152).
# Ray (2 ranks), 50 steps: reward 0.261 → 0.362 / 0.277 → 0.365 / 0.267 → 0.313 (+0.102 / +0.088 / +0.046);
# cost 0.284 → 0.126 / 0.259 → 0.160 / 0.253 → 0.170.
CASES = [
    (["executor=inprocess"], 50, 0.04),
    pytest.param(RAY, 50, 0.02, marks=pytest.mark.ray),
]


@pytest.mark.parametrize("executor,steps,gain", CASES)
def test_safe_rlhf_meets_the_cost_threshold_and_learns(warmed, tmp_path, runs, executor, steps, gain):
    if "executor=ray" in executor:
        pytest.importorskip("ray")
    run = run_recipe("safe_rlhf", [*warmed, *executor, f"trainer.steps={steps}", f"trainer.run_dir={tmp_path}",
                                   "trainer.val_every=0", "trainer.val_before_train=false"])
    rows = list(train_rows(tmp_path).values())
    assert run.step == steps and [r["step"] for r in rows] == list(range(1, steps + 1))
    assert set(run.groups) == {"actor", "ref", "critic", "cost_critic", "reward", "cost"}
    reward_first, reward_last = first_last(rows, "reward/mean")
    cost_first, cost_last = first_last(rows, "cost/mean")
    lambdas = [r["lagrange/lambda"] for r in rows]
    print(f"safe_rlhf {executor}: reward {reward_first:.3f} → {reward_last:.3f}, cost {cost_first:.3f} → "
          f"{cost_last:.3f} (threshold {THRESHOLD}), λ max {max(lambdas):.2f}, last {lambdas[-1]:.2f}")
    assert cost_first > THRESHOLD, "the cost no longer starts above the threshold: the test shows nothing"
    assert cost_last < THRESHOLD, f"cost {cost_first:.3f} → {cost_last:.3f}, wanted < {THRESHOLD}"
    assert reward_last - reward_first >= gain, f"reward {reward_first:.3f} → {reward_last:.3f}, wanted +{gain}"
    # the dual step as logged: λ_k = max(0, λ_{k-1} + lr·(cost_k − d)) with lr = 1.0
    previous = 0.0
    for row in rows:
        assert row["lagrange/cost_gap"] == pytest.approx(row["cost/mean"] - THRESHOLD, abs=1e-9)
        assert row["lagrange/lambda"] == pytest.approx(max(0.0, previous + row["lagrange/cost_gap"]), abs=1e-9)
        previous = row["lagrange/lambda"]
    assert max(lambdas) > 0.5  # the constraint was active
    for key in ("critic/vf_loss", "cost_critic/vf_loss", "cost_critic/grad_norm", "cost/num_failed"):
        assert key in rows[0], key


class Interrupted(Exception):
    pass


def test_resume_restores_lambda(warmed, tmp_path_factory, monkeypatch):
    """A run that crashes after step 3 and resumes from its step-2 checkpoint continues λ from the
    saved value (not from ``init``) and matches the uninterrupted run."""
    from hybridflow.trainer.run import RLRun

    def args(run_dir, *extra):
        return [*warmed, f"trainer.run_dir={run_dir}", "trainer.steps=4", "data.batch_size=8", "rollout.n=4",
                "trainer.val_every=0", "trainer.val_before_train=false", "trainer.save_every=2",
                "trainer.plot=false", "algorithm.lagrange.threshold=0.05", *extra]  # λ surely grows

    run_a, run_b = tmp_path_factory.mktemp("safe_A"), tmp_path_factory.mktemp("safe_B")
    run_recipe("safe_rlhf", args(run_a))

    original = RLRun.end_step

    def end_step(self, *a, **kw):
        out = original(self, *a, **kw)
        if self.step == 3:
            raise Interrupted("simulated crash after step 3")
        return out

    with monkeypatch.context() as patch:
        patch.setattr(RLRun, "end_step", end_step)
        with pytest.raises(Interrupted):
            run_recipe("safe_rlhf", args(run_b))
    saved = json.loads((run_b / "checkpoints" / "step_2" / "controller.json").read_text())["controllers"]["lagrange"]
    assert saved["value"] > 0  # the warmed model's cost (~0.27) is above 0.05: λ has grown

    run = run_recipe("safe_rlhf", args(run_b, "trainer.resume=auto"))
    assert run.step == 4 and run.controllers["lagrange"].value > 0
    want, got = train_rows(run_a), train_rows(run_b)
    assert sorted(got) == [1, 2, 3, 4]
    # the resumed step 3 starts from the saved λ (not from 0): λ_3 = max(0, λ_2 + 1.0·(cost_3 − d))
    assert got[3]["lagrange/lambda"] == pytest.approx(max(0.0, saved["value"] + got[3]["lagrange/cost_gap"]))
    for step in (1, 2, 3, 4):
        for key in ("lagrange/lambda", "cost/mean", "reward/mean"):
            assert got[step][key] == pytest.approx(want[step][key], abs=1e-6), f"step {step}: {key}"
    final = json.loads((run_b / "checkpoints" / "step_4" / "controller.json").read_text())
    assert final["controllers"]["lagrange"]["value"] == pytest.approx(got[4]["lagrange/lambda"])

    # a checkpoint without λ is refused on resume, not silently restarted from algorithm.lagrange.init
    saved_file = run_a / "checkpoints" / "step_4" / "controller.json"
    state = json.loads(saved_file.read_text())
    del state["controllers"]
    saved_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="holds no state for the controller 'lagrange'"):
        run_recipe("safe_rlhf", args(run_a, "trainer.steps=5"))


@pytest.mark.parametrize("override, error, match", [
    ("cost.function=builtin:nope", ValueError, "unknown built-in reward 'builtin:nope'"),
    ("+algorithm.lagrange.treshold=0.1", ValueError, r"unknown Lagrange multiplier key\(s\) \['treshold'\]"),
])
def test_bad_cost_or_lagrange_config_fails_before_any_worker(warmed, tmp_path, no_workers, override, error, match):
    with pytest.raises(error, match=match):
        run_recipe("safe_rlhf", [*warmed, f"trainer.run_dir={tmp_path}", override])


@pytest.mark.parametrize("response, cost", [
    ("31204", 0.0),    # the right answer reorders the prompt's digits: never a cost
    ("42", 0.0),       # wrong and short, but only digits of the prompt
    ("", 0.0),
    ("31254", 1.0),    # 5 is not in "40213="
    ("3120 9x", 1.0),  # any foreign digit, wherever it is; non-digits do not count
    ("abc", 0.0),
])
def test_foreign_digit_cost(response, cost):
    from hybridflow.trainer.rewards import load_reward_function

    assert load_reward_function("builtin:foreign_digit")("40213=", response, "31204") == cost
