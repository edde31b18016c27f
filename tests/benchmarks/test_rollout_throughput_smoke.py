"""Smoke test of benchmarks/rollout_throughput.py: hf and static side by side on the tiny config
write the JSON it documents. No timing assertions: the numbers depend on the machine."""
import json

import pytest

from benchmarks.rollout_throughput import main

from . import positive

TINY = ["--config", "benchmarks/configs/tiny.yaml", "--warmup", "1", "--reps", "2", "data.batch_size=2",
        "rollout.n=2", "prompt_length=5", "response_length=6"]


@pytest.mark.parametrize("sequential", [False, True])
def test_hf_and_static_side_by_side(tmp_path, capsys, sequential):
    out = tmp_path / "rollout.json"
    argv = TINY + ["--backends", "hf,static", "--run-dir", str(tmp_path / "run"), "--out", str(out),
                   "rollout.do_sample=false"] + (["--sequential"] if sequential else [])
    returned = main(argv)
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))
    meta, results = report["meta"], report["results"]
    assert meta["backends"] == ["hf", "static"] and meta["order"] == ("sequential" if sequential else "interleaved")
    assert (meta["rows"], meta["prompt_length"], meta["response_length"], meta["reps"]) == (4, 5, 6, 2)
    assert [r["backend"] for r in results] == ["hf", "static"]
    for r in results:
        assert len(r["times_s"]) == 2 and all(positive(t) for t in r["times_s"])
        assert r["generated_tokens"] == 4 * 6  # ignore_eos: every response is full length
        assert positive(r["median_s"]) and positive(r["tokens_per_s"]) and positive(r["speedup_vs_first"])
        assert r["logprob_gap_max"] < 1e-4  # fp32 on CPU: both equal the trainer's log-probs
        assert r["greedy_rows_equal_first"] == 1.0  # greedy: static gives generate's tokens
    assert results[0]["speedup_vs_first"] == 1.0
    table = capsys.readouterr().out
    assert "| hf |" in table and "| static |" in table and "generated tokens/s" in table


def test_sampling_and_unknown_backend(tmp_path):
    report = main(TINY + ["--backends", "static", "--run-dir", str(tmp_path / "run"), "rollout.temperature=0.7",
                          "rollout.static.cuda_graph=false"])
    assert report["meta"]["sampling"]["temperature"] == 0.7 and report["meta"]["sampling"]["do_sample"] is True
    assert "greedy_rows_equal_first" not in report["results"][0]
    assert report["results"][0]["logprob_gap_max"] < 1e-4
    with pytest.raises(SystemExit, match="unknown.*nope"):
        main(TINY + ["--backends", "hf,nope", "--run-dir", str(tmp_path / "run")])
