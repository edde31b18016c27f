"""Smoke test of benchmarks/rlhf_step.py on the tiny config: 1 warm-up + 2 timed steps in-process
write the JSON it documents. No timing assertions: the numbers depend on the machine."""
import json

import pytest

from benchmarks.rlhf_step import STAGES, main
from hybridflow.config import ConfigError

from . import positive

TINY = ["--config", "benchmarks/configs/tiny.yaml", "warmup_steps=1", "steps=2", "data.batch_size=2",
        "rollout.n=2", "prompt_length=6", "response_length=5", "--peak-tflops", "0.05"]


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_tiny_inprocess(tmp_path, capsys, algo):
    out = tmp_path / "rlhf_step.json"
    returned = main(TINY + ["--algo", algo, "--run-dir", str(tmp_path / "run"), "--out", str(out)])
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))  # the file holds what main returned

    meta, summary, steps = report["meta"], report["summary"], report["steps"]
    assert meta["algo"] == algo and meta["executor"] == "inprocess" and meta["world_size"] == 1
    assert (meta["prompts"], meta["n"], meta["rows"]) == (2, 2, 4)
    assert (meta["prompt_length"], meta["response_length"], meta["warmup_steps"], meta["steps"]) == (6, 5, 1, 2)
    assert meta["peak_tflops"] == 0.05 and meta["peak_source"] == "--peak-tflops"
    assert meta["config"]["rollout"]["ignore_eos"] is True and meta["config"]["rollout"]["max_new_tokens"] == 5
    for key in ("params", "non_embedding_params", "actor_flop_params", "critic_flop_params", "setup_s"):
        assert positive(meta[key]), key

    assert set(summary) == {"step_s", "tokens_per_s", "gen_tokens_per_s", "update_mfu", "peak_memory_gb",
                            "stage_s", "stage_share", "stage_mfu"}
    assert list(summary["stage_s"]) == list(STAGES[algo])
    for key in ("step_s", "tokens_per_s", "gen_tokens_per_s", "update_mfu", "peak_memory_gb"):
        assert positive(summary[key]), key
    assert all(positive(v) for v in summary["stage_s"].values()), summary["stage_s"]
    assert all(positive(v) for v in summary["stage_mfu"].values()), summary["stage_mfu"]
    assert "update_actor" in summary["stage_mfu"] and ("update_critic" in summary["stage_mfu"]) == (algo == "ppo")

    assert [s["step"] for s in steps] == [2, 3]  # the warm-up step is not in the numbers
    for record in steps:
        # ignore_eos: every response is exactly response_length tokens, no padding anywhere
        assert record["gen_tokens"] == 4 * 5 and record["prompt_tokens"] == 4 * 6 and record["tokens"] == 4 * 11
        assert all(positive(record[f"{s}_s"]) for s in STAGES[algo])
    table = capsys.readouterr().out
    assert "| update_actor |" in table and "| **step** |" in table and "tokens/s per device" in table


def test_reuses_a_checkpoint_of_the_same_shape_and_rejects_unknown_keys(tmp_path):
    run = ["--run-dir", str(tmp_path / "run")]
    main(TINY + run + ["steps=1"])
    stamp = (tmp_path / "run" / "ckpt" / "model.safetensors").stat().st_mtime_ns
    main(TINY + run + ["steps=1"])
    assert (tmp_path / "run" / "ckpt" / "model.safetensors").stat().st_mtime_ns == stamp
    main(TINY + run + ["steps=1", "shape.intermediate_size=96"])  # another shape: written anew
    assert (tmp_path / "run" / "ckpt" / "model.safetensors").stat().st_mtime_ns != stamp
    with pytest.raises(ConfigError, match="unknown config key 'actor.lrr'"):
        main(TINY + run + ["actor.lrr=1"])
