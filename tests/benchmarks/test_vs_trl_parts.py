"""benchmarks/vs_trl.py without TRL (it lives in a throwaway environment, never here): the report
arithmetic, our side's command line, and the turns two processes take (benchmarks/lockstep.py)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks.lockstep import Turns
from benchmarks.vs_trl import compare, our_command, summarize_run

from .conftest import REPO


def test_summaries_and_ratios():
    rows = [{"step_s": s, "reward": r, "tokens": 100.0} for s, r in
            [(9.0, 0.0), (1.0, 0.1), (2.0, 0.2), (3.0, 0.3), (4.0, 0.4)]]
    summary = summarize_run(rows, warmup=1)
    assert summary["step_s_median"] == 2.5 and summary["steps"] == 5  # the warm-up step is left out
    assert summary["tokens_per_s"] == pytest.approx((100 / 2 + 100 / 3) / 2)  # the median of per-step rates
    assert summary["reward_first10"] == pytest.approx(0.2) and summary["rewards"][-1] == 0.4
    pairs = [{"trl": {"step_s_median": 2.0, "greedy_accuracy": 0.5}, "ours": {"step_s_median": 1.0, "greedy_accuracy": 0.6}},
             {"trl": {"step_s_median": 4.0}, "ours": {"step_s_median": 3.0}}]
    result = compare(pairs)
    assert result["ratio_per_pair"] == [0.5, 0.75] and result["ratio_median"] == 0.625
    assert result["greedy_accuracy"] == {"trl": [0.5, None], "ours": [0.6, None]}


def test_our_command_is_a_valid_grpo_run():
    from hybridflow.config import parse_cli

    args = SimpleNamespace(prompts=8, n=8, max_new_tokens=6, backend="hf", lr=1e-4, steps=200, overrides=[])
    cmd = our_command("m", {"train": "t.parquet", "val": "v.parquet"}, 0, args, Path("/tmp/o"))
    assert cmd[1].endswith("recipes/grpo.py")
    cfg = parse_cli(cmd[2:], str(Path(REPO) / "recipes" / "grpo.yaml"))  # every key exists, every value parses
    assert cfg.actor.use_kl_loss is False and cfg.rollout.n == 8 and cfg.trainer.callbacks[0].endswith(":Lockstep")


SIDE = textwrap.dedent('''
    import json, os, sys, time
    sys.path.insert(0, sys.argv[1])
    from lockstep import Lockstep
    turns, log = Lockstep(), sys.argv[2]
    for step in range(1, int(sys.argv[3]) + 1):
        turns.on_step_begin()
        with open(log, "a") as f:
            f.write(json.dumps([turns.side, step]) + "\\n")
        time.sleep(0.01)
        turns.on_step_end(final=step == int(sys.argv[3]))
''')


def test_two_processes_take_turns_of_k_steps(tmp_path):
    script, log = tmp_path / "side.py", tmp_path / "order.jsonl"
    script.write_text(SIDE)
    turns = Turns(str(tmp_path / "fifos"), ("a", "b"))
    procs = {side: subprocess.Popen([sys.executable, str(script), str(Path(REPO) / "benchmarks"), str(log), "5"],
                                    env={**__import__("os").environ, **turns.env(side)}) for side in ("a", "b")}
    turns.run(5, procs, per_turn=2, timeout_s=60)
    assert all(p.wait(timeout=60) == 0 for p in procs.values())  # released after the last step
    order = [tuple(json.loads(line)) for line in log.read_text().splitlines()]
    assert order == [("a", 1), ("a", 2), ("b", 1), ("b", 2), ("a", 3), ("a", 4), ("b", 3), ("b", 4),
                     ("a", 5), ("b", 5)]
