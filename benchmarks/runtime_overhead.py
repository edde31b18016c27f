"""Per-call overhead of the single controller, for each executor side by side.

    python -m benchmarks.runtime_overhead --torch-threads 1 --out runtime_overhead.json   # ~1.5 min, 2 cores
    python -m benchmarks.runtime_overhead --quick                                        # under a minute

(``--torch-threads 1``: on a small or busy machine torch's intra-op threads in the controller
oversubscribe the cores and make the in-process batch copies erratic.)

What is measured (each after a warm-up, then N repetitions; median and p90 per call):

- ``empty_one_to_all``: a ``ONE_TO_ALL`` method that does nothing — the fixed cost of one group
  call (dispatch, submit to every rank, wait, collect).
- ``dp_identity``: a ``DP_COMPUTE_PROTO`` method that returns its chunk, called on a rollout-sized
  DataProto (default 256 rows of 512 prompt + 512 response tokens: ``input_ids`` and
  ``attention_mask`` int64 [256, 1024], ``old_log_probs`` and ``advantages`` float32 [256, 512] and
  four object columns ``uid``, ``raw_prompt``, ``data_source``, ``extra_info``; ~5.2 MB of tensors).
  MB/s = payload bytes (pickled size of the batch) / median time: the batch goes out and comes back
  once per call.
- ``future_chain``: ``consumer.identity(producer.identity_async(batch))`` between two groups on
  separate processes: the producer's output reaches the consumer as a future (on Ray through the
  object store, never through the controller).
- ``controller_chain``: the same two calls with a blocking producer, so the batch makes the round
  trip through the controller in between — the baseline that ``future_chain`` avoids.

Baselines without the runtime, for scale: a pickle round trip of the batch on the controller and,
when a Ray configuration runs, an empty call and a batch echo on a bare Ray actor.

Configurations: ``inprocess`` world 1, ``ray`` world 1 and ``ray`` world 2 (``--configs``). The
table gives each configuration's median as a ratio of the inprocess median of the same benchmark.
There are no absolute targets: the numbers depend on the machine; compare ratios within one run.
"""
from __future__ import annotations

import argparse
import os
import pickle
import platform
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from benchmarks.cli import write_report
from hybridflow import DataProto, Dispatch, ResourcePool, Worker, WorkerGroup, register

MB = 1e6  # MB and MB/s are 10**6 bytes

BENCHMARKS = ("empty_one_to_all", "dp_identity", "future_chain", "controller_chain")
TITLES = {
    "empty_one_to_all": "empty ONE_TO_ALL call",
    "dp_identity": "DP_COMPUTE_PROTO identity",
    "future_chain": "2 groups, future passed",
    "controller_chain": "2 groups, via controller",
}
DEFAULT_CONFIGS = "inprocess:1,ray:1,ray:2"
PRESETS = {  # (warmup, reps of empty calls, reps of data calls)
    "quick": (3, 200, 15),
    "full": (10, 2000, 100),
}


class BenchWorker(Worker):
    """The methods under test do no work: what is left is the runtime's cost."""

    @register(dispatch=Dispatch.ONE_TO_ALL)
    def noop(self) -> None:
        return None

    @register(dispatch=Dispatch.DP_COMPUTE_PROTO)
    def identity(self, data: DataProto) -> DataProto:
        return data

    @register(dispatch=Dispatch.DP_COMPUTE_PROTO, blocking=False)
    def identity_async(self, data: DataProto) -> DataProto:
        return data


class EchoActor:
    """A bare Ray actor (no hybridflow): the baseline of what Ray alone costs per call."""

    def noop(self) -> None:
        return None

    def echo(self, value: Any) -> Any:
        return value


def ray_baseline(data: DataProto, payload_mb: float, warmup: int, reps_empty: int, reps_data: int) -> dict:
    """Empty call and batch echo on one plain Ray actor, for comparison with the ray w1 rows."""
    import ray

    from hybridflow.executors.ray import ensure_ray

    ensure_ray()
    actor = ray.remote(EchoActor).options(num_cpus=0.5).remote()
    try:
        ray.get(actor.noop.remote())
        return {"empty_call": summarize(time_calls(lambda: ray.get(actor.noop.remote()), warmup, reps_empty)),
                "echo_batch": summarize(time_calls(lambda: ray.get(actor.echo.remote(data)), warmup, reps_data),
                                        payload_mb)}
    finally:
        ray.kill(actor)


def make_batch(rows: int = 256, prompt_len: int = 512, response_len: int = 512, seed: int = 0) -> DataProto:
    """A rollout-shaped batch (column names of docs/design/contracts.md)."""
    gen = torch.Generator().manual_seed(seed)
    seq = prompt_len + response_len
    tensors = {
        "input_ids": torch.randint(0, 32000, (rows, seq), generator=gen),
        "attention_mask": torch.ones(rows, seq, dtype=torch.int64),
        "old_log_probs": -torch.rand(rows, response_len, generator=gen),
        "advantages": torch.randn(rows, response_len, generator=gen),
    }
    non_tensors = {
        "uid": [f"prompt-{i // 8}" for i in range(rows)],
        "raw_prompt": [f"Question {i}: what is {i} + {2 * i}? Think step by step. " * 4 for i in range(rows)],
        "data_source": ["gsm8k"] * rows,
        "extra_info": [{"index": i, "split": "train"} for i in range(rows)],
    }
    return DataProto.from_dict(tensors, non_tensors, meta_info={"temperature": 1.0})


def payload_sizes(data: DataProto) -> dict[str, float]:
    return {"tensor_mb": data.nbytes() / MB, "pickled_mb": len(pickle.dumps(data, protocol=5)) / MB}


def time_calls(fn: Callable[[], Any], warmup: int, reps: int) -> list[float]:
    """Seconds per call of ``fn`` for ``reps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def summarize(samples: list[float], payload_mb: float | None = None) -> dict[str, float]:
    median = float(np.median(samples))
    out = {"median_ms": median * 1e3, "p90_ms": float(np.percentile(samples, 90)) * 1e3,
           "calls_per_s": 1.0 / median, "reps": len(samples)}
    if payload_mb is not None:
        out["mb_per_s"] = payload_mb / median
    return out


def parse_configs(text: str) -> list[tuple[str, int]]:
    configs = []
    for item in text.split(","):
        executor, _, world = item.strip().partition(":")
        if executor not in ("inprocess", "ray") or not world.isdigit() or int(world) < 1:
            raise SystemExit(f"--configs: bad entry {item!r}; use executor:world_size, e.g. {DEFAULT_CONFIGS}")
        configs.append((executor, int(world)))
    return configs


def bench_config(executor: str, world_size: int, data: DataProto, payload_mb: float, warmup: int,
                 reps_empty: int, reps_data: int) -> dict[str, Any]:
    """All benchmarks on one executor/world size; two groups on one pool (separate processes on Ray)."""
    start = time.perf_counter()
    pool = ResourcePool(world_size=world_size, executor=executor, num_cpus_per_worker=0.5)
    producer = WorkerGroup(pool, BenchWorker)
    consumer = WorkerGroup(pool, BenchWorker)
    try:
        producer.noop()
        consumer.noop()
        result: dict[str, Any] = {"executor": executor, "world_size": world_size,
                                  "setup_s": time.perf_counter() - start}

        def check(out: DataProto) -> None:  # the identity really went through, once
            if len(out) != len(data) or not torch.equal(out.batch["input_ids"], data.batch["input_ids"]):
                raise RuntimeError(f"{executor} w{world_size}: identity call changed the batch")

        check(consumer.identity(producer.identity_async(data)))
        result["empty_one_to_all"] = summarize(time_calls(producer.noop, warmup, reps_empty))
        result["dp_identity"] = summarize(time_calls(lambda: producer.identity(data), warmup, reps_data), payload_mb)
        result["future_chain"] = summarize(
            time_calls(lambda: consumer.identity(producer.identity_async(data)), warmup, reps_data), payload_mb)
        result["controller_chain"] = summarize(
            time_calls(lambda: consumer.identity(producer.identity(data)), warmup, reps_data), payload_mb)
        return result
    finally:
        producer.shutdown()
        consumer.shutdown()
        pool.shutdown()


def format_table(results: dict[str, dict], meta: dict) -> str:
    """Markdown table: one row per benchmark and configuration, ratio against inprocess."""
    lines = [f"Payload of the data calls: {meta['rows']} rows, {meta['payload']['tensor_mb']:.2f} MB of tensors, "
             f"{meta['payload']['pickled_mb']:.2f} MB pickled (MB = 10^6 bytes).",
             "",
             "| benchmark | executor | median ms | p90 ms | calls/s | MB/s | median vs inprocess |",
             "|---|---|---:|---:|---:|---:|---:|"]
    base = next((r for r in results.values() if r["executor"] == "inprocess"), None)
    for name in BENCHMARKS:
        for label, res in results.items():
            stats = res[name]
            ratio = f"{stats['median_ms'] / base[name]['median_ms']:.1f}x" if base else "-"
            mbs = f"{stats['mb_per_s']:.0f}" if "mb_per_s" in stats else "-"
            lines.append(f"| {TITLES[name]} | {label} | {stats['median_ms']:.3f} | {stats['p90_ms']:.3f} | "
                         f"{stats['calls_per_s']:.0f} | {mbs} | {ratio} |")
    setup = ", ".join(f"{label} {res['setup_s']:.1f} s" for label, res in results.items())
    lines += ["", f"Setup (pool + 2 groups + first call, not in the numbers above): {setup}.",
              f"Load average (1 min) before/after: {meta['loadavg_1m_before']:.2f} / {meta['loadavg_1m_after']:.2f} "
              f"on {meta['cpu_count']} CPUs."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.runtime_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (under a minute on 2 cores)")
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"executor:world_size list (default {DEFAULT_CONFIGS})")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--response-len", type=int, default=512)
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads of the controller (default: torch's)")
    parser.add_argument("--warmup", type=int, help="untimed calls before each benchmark")
    parser.add_argument("--reps-empty", type=int, help="timed calls of the empty method")
    parser.add_argument("--reps-data", type=int, help="timed calls of the data benchmarks")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmarks, print the table, write ``--out``; returns the JSON-able results."""
    args = parse_args(argv)
    warmup, reps_empty, reps_data = PRESETS["quick" if args.quick else "full"]
    warmup = args.warmup if args.warmup is not None else warmup
    reps_empty = args.reps_empty or reps_empty
    reps_data = args.reps_data or reps_data
    configs = parse_configs(args.configs)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    data = make_batch(args.rows, args.prompt_len, args.response_len)
    payload = payload_sizes(data)
    pickle_rt = summarize(time_calls(lambda: pickle.loads(pickle.dumps(data, protocol=5)), warmup, reps_data),
                          payload["pickled_mb"])
    meta = {
        "command": " ".join(["python -m benchmarks.runtime_overhead"] + list(sys.argv[1:] if argv is None else argv)),
        "quick": args.quick, "rows": args.rows, "prompt_len": args.prompt_len, "response_len": args.response_len,
        "payload": payload, "warmup": warmup, "reps_empty": reps_empty, "reps_data": reps_data,
        "pickle_roundtrip": pickle_rt,
        "python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "loadavg_1m_before": os.getloadavg()[0],  # other processes on the machine skew the numbers
    }

    ray_was_running = False
    if any(executor == "ray" for executor, _ in configs):
        import ray

        ray_was_running = ray.is_initialized()
        meta["ray"] = ray.__version__
    results: dict[str, dict] = {}
    try:
        for executor, world in configs:
            label = f"{executor} w{world}"
            print(f"[runtime_overhead] {label} ...", file=sys.stderr, flush=True)
            results[label] = bench_config(executor, world, data, payload["pickled_mb"], warmup, reps_empty,
                                          reps_data)
        if "ray" in meta:
            print("[runtime_overhead] plain Ray actor baseline ...", file=sys.stderr, flush=True)
            meta["ray_baseline"] = ray_baseline(data, payload["pickled_mb"], warmup, reps_empty, reps_data)
    finally:
        if "ray" in meta and not ray_was_running:
            import ray

            ray.shutdown()

    meta["loadavg_1m_after"] = os.getloadavg()[0]
    report = {"meta": meta, "results": results}
    print(format_table(results, meta))
    print(f"\nBaselines without the runtime: pickle round trip of the batch on the controller "
          f"{pickle_rt['median_ms']:.3f} ms median", end="")
    if "ray_baseline" in meta:
        base = meta["ray_baseline"]
        print(f"; plain Ray actor: empty call {base['empty_call']['median_ms']:.3f} ms, "
              f"echo of the batch {base['echo_batch']['median_ms']:.3f} ms median", end="")
    print(".")
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    # Import through the package so Ray workers unpickle BenchWorker by reference, not from __main__.
    from benchmarks.runtime_overhead import main as _main

    _main()
