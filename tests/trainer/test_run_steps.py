"""RLRun.steps(): one Step per training step, its prompts with uids and seeds, more prompts for a
step (DAPO), the step timer, and the rule that every step logs (no workers needed)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybridflow.config import load_config

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.fixture
def run(tiny_ckpt, tmp_path):
    from hybridflow.trainer.run import RLRun
    from hybridflow.trainer.tasks import make_reverse_data

    data = make_reverse_data(tmp_path / "data", n_train=16, n_val=4, n_sft=4)
    cfg = load_config(str(RECIPES / "grpo.yaml"),
                      [f"model.path={tiny_ckpt}", f"data.train={data['train']}", f"data.val={data['val']}",
                       f"trainer.run_dir={tmp_path / 'run'}", "data.batch_size=4", "trainer.steps=3", "seed=7",
                       "trainer.val_every=0", "trainer.val_before_train=false", "trainer.plot=false"])
    run = RLRun(cfg)
    run.attach()
    return run


def test_steps_hand_out_prompts_and_log_each_step(run):
    from hybridflow.trainer.run import prompt_seed

    seen = []
    for step in run.steps():
        uids = list(step.prompts.non_tensor_batch["uid"])
        assert uids == [f"{step.number}-{i}" for i in range(4)]
        assert step.prompts.meta_info["seed"] == prompt_seed(7, step.number) == 7 * 100003 + step.number
        more = step.more_prompts()  # DAPO's next round: the next prompts of the data order, their own uids
        assert list(more.non_tensor_batch["uid"]) == [f"{step.number}.2-{i}" for i in range(4)]
        assert more.meta_info["seed"] == 7 * 100003 + step.number + 1_000_003 * 2
        assert list(more.non_tensor_batch["raw_prompt"]) != list(step.prompts.non_tensor_batch["raw_prompt"])
        with step.stage("work"):
            pass
        step.log(step.prompts, {"probe/value": float(step.number)})
        seen.append(step.number)
    assert seen == [1, 2, 3] and run.step == 3
    rows = [json.loads(line) for line in open(run.run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["probe/value"] for r in rows] == [1.0, 2.0, 3.0]
    assert all(r["timing/step_s"] >= r["timing/work_s"] >= 0 for r in rows)
    assert run.loader.steps_taken == 6  # two draws per step: the checkpoint stores where the data order is


def test_a_step_that_does_not_log_is_an_error(run):
    steps = run.steps()
    next(steps)
    with pytest.raises(RuntimeError, match=r"step 1 ended without step.log"):
        next(steps)


def test_a_step_logs_once(run):
    step = next(run.steps())
    step.log(step.prompts)
    with pytest.raises(RuntimeError, match="called twice"):
        step.log(step.prompts)


CALLBACK_PY = '''
EVENTS = []


class Recorder:
    def on_step_begin(self, run, step):
        EVENTS.append(("begin", step, run.loader.steps_taken))

    def on_step_end(self, run, metrics):
        EVENTS.append(("end", metrics["step"], "timing/step_s" in metrics))
'''


def test_callbacks_named_by_path_see_each_step(tiny_ckpt, tmp_path):
    """``trainer.callbacks``: on_step_begin before the step draws its prompts, on_step_end with its
    logged metrics; a spec that does not load fails before anything runs, naming the entry."""
    from hybridflow.config import ConfigError
    from hybridflow.imports import load_file
    from hybridflow.trainer.run import RLRun
    from hybridflow.trainer.tasks import make_reverse_data

    (tmp_path / "cb.py").write_text(CALLBACK_PY)
    data = make_reverse_data(tmp_path / "data", n_train=16, n_val=4, n_sft=4)
    base = [f"model.path={tiny_ckpt}", f"data.train={data['train']}", "data.val=null", "data.batch_size=4",
            "trainer.steps=2", "trainer.val_before_train=false", "trainer.plot=false"]
    run = RLRun(load_config(str(RECIPES / "grpo.yaml"), [*base, f"trainer.run_dir={tmp_path / 'run'}",
                                                          f"trainer.callbacks=[{tmp_path / 'cb.py'}:Recorder]"]))
    run.attach()
    for step in run.steps():
        step.log(step.prompts)
    events = load_file(tmp_path / "cb.py", "cb").EVENTS
    assert events == [("begin", 1, 0), ("end", 1, True), ("begin", 2, 1), ("end", 2, True)]
    with pytest.raises(ConfigError, match=r"trainer.callbacks\[0\].*defines no 'Recordr'"):
        RLRun(load_config(str(RECIPES / "grpo.yaml"), [*base, f"trainer.run_dir={tmp_path / 'bad'}",
                                                        f"trainer.callbacks=[{tmp_path / 'cb.py'}:Recordr]"]))
