"""Smoke test of benchmarks/runtime_overhead.py: a tiny run produces the JSON it documents.
No timing assertions: the numbers depend on the machine."""
import json

import pytest

from benchmarks.runtime_overhead import BENCHMARKS, main

from . import positive

TINY = ["--quick", "--rows", "6", "--prompt-len", "8", "--response-len", "8",
        "--warmup", "1", "--reps-empty", "5", "--reps-data", "3"]


def check_stats(stats: dict, with_throughput: bool) -> None:
    keys = {"median_ms", "p90_ms", "calls_per_s", "reps"} | ({"mb_per_s"} if with_throughput else set())
    assert set(stats) == keys
    assert all(positive(stats[k]) for k in keys), stats
    assert stats["p90_ms"] >= stats["median_ms"]


def run(tmp_path, configs: str) -> dict:
    out = tmp_path / "overhead.json"
    returned = main(TINY + ["--configs", configs, "--out", str(out)])
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))  # the file holds what main returned
    return report


def check_report(report: dict, labels: list[str]) -> None:
    meta, results = report["meta"], report["results"]
    assert meta["rows"] == 6 and meta["reps_empty"] == 5 and meta["reps_data"] == 3
    assert positive(meta["payload"]["tensor_mb"]) and positive(meta["payload"]["pickled_mb"])
    check_stats(meta["pickle_roundtrip"], with_throughput=True)
    assert list(results) == labels
    for label in labels:
        res = results[label]
        executor, world = label.split(" w")
        assert res["executor"] == executor and res["world_size"] == int(world)
        assert res["setup_s"] >= 0
        for name in BENCHMARKS:
            check_stats(res[name], with_throughput=name != "empty_one_to_all")
        assert res["empty_one_to_all"]["reps"] == 5 and res["dp_identity"]["reps"] == 3


def test_inprocess(tmp_path, capsys):
    report = run(tmp_path, "inprocess:1")
    check_report(report, ["inprocess w1"])
    assert "ray_baseline" not in report["meta"]
    table = capsys.readouterr().out
    assert "| DP_COMPUTE_PROTO identity | inprocess w1 |" in table and "1.0x" in table


@pytest.fixture(scope="session")
def ray_cluster():
    """Ray started once and left running (as tests/runtime does), so the benchmark does not pay for
    starting and stopping it."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    from hybridflow.executors.ray import ensure_ray

    ensure_ray()
    yield ray


@pytest.mark.ray
def test_inprocess_and_ray_world_1(tmp_path, ray_cluster):
    report = run(tmp_path, "inprocess:1,ray:1")
    check_report(report, ["inprocess w1", "ray w1"])
    check_stats(report["meta"]["ray_baseline"]["empty_call"], with_throughput=False)
    check_stats(report["meta"]["ray_baseline"]["echo_batch"], with_throughput=True)
    assert ray_cluster.is_initialized()  # main() leaves a Ray it did not start running


def test_bad_configs_argument():
    with pytest.raises(SystemExit, match="--configs: bad entry 'gpu:1'"):
        main(TINY + ["--configs", "gpu:1"])
