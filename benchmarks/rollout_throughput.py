"""Rollout throughput of several backends side by side, in one process, on the same prompts.

    python -m benchmarks.rollout_throughput --backends hf,static [--config benchmarks/configs/tiny.yaml]
                                            [--reps K] [--warmup W] [--sequential] [--out FILE.json]
                                            [--run-dir DIR] [--torch-threads T] [key=value ...]

Any name of ``ROLLOUT_BACKENDS`` (workers/rollout/__init__.py) works, e.g. ``--backends hf,vllm``.
The config is a benchmark YAML of benchmarks/configs/ (the one benchmarks.rlhf_step reads): the
model ``shape`` (random weights, written once into ``<run-dir>/ckpt``), ``prompt_length``,
``response_length``, ``data.batch_size`` prompts × ``rollout.n`` samples, the sampling keys of
``rollout`` (``key=value`` overrides, e.g. ``rollout.do_sample=false`` or
``rollout.static.cuda_graph=false``); ``--warmup``/``--reps`` default to its
``warmup_steps``/``steps``.

Every backend is built on one actor engine (``actor`` section, as the actor worker builds it:
bf16 on a GPU, fp32 on a CPU) with ``build_rollout``, takes the engine's weights
(``sync_weights``), and generates for the same prompts (every prompt exactly ``prompt_length``
random ids) with ``ignore_eos=true``, so every response is exactly ``response_length`` tokens.
Each call is timed alone (``wake_up``/``sleep`` around it are not timed; on a GPU the timer
synchronises). By default the repetitions are interleaved — rep 1 of every backend, then rep 2 —
so a load change on a shared machine hits all backends alike; ``--sequential`` runs one backend
at a time and frees it before the next (for backends that reserve memory, like vLLM).

Reported per backend: median and p90 seconds per call, generated tokens/s (rows × response_length
/ median), the ratio to the first backend, the largest |rollout_log_probs − trainer log-prob|
(``engine.forward`` on the last output, at the rollout temperature) and, for greedy decoding, the
share of responses identical to the first backend's; for a backend with its own weight copy
(vLLM) the weight-sync time, the median of ``SYNC_REPS`` syncs from the actor engine.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tensordict import TensorDict

from benchmarks.cli import machine_meta, names_from, parse_with_overrides, write_report
from benchmarks.rlhf_step import DEFAULT_CONFIG, build_checkpoint, load_bench_config
from hybridflow.config import apply_overrides

SAMPLING = ("temperature", "top_p", "top_k", "do_sample")
SYNC_REPS = 3  # timed weight syncs per backend (median reported)


def make_prompts(rows: int, length: int, vocab: int, seed: int) -> TensorDict:
    """``rows`` prompts of exactly ``length`` random ids in ``[2, vocab)`` (no padding, no EOS)."""
    ids = torch.randint(2, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))
    return TensorDict({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                       "position_ids": torch.arange(length).expand(rows, length).clone()}, batch_size=[rows])


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Bench:
    """One backend: its rollout, its timings, its last output."""

    def __init__(self, name: str, engine, settings):
        from hybridflow.workers.rollout import build_rollout

        self.name, self.times, self.out, self.peak_gb = name, [], None, 0.0
        start = time.perf_counter()
        self.rollout = build_rollout(name, engine, settings.rollout, settings.seed)
        self.rollout.sync_weights(engine)
        self.rollout.sleep()
        self.setup_s = time.perf_counter() - start
        # the weight sync after each actor update, timed alone ({} for backends without a weight copy)
        self.syncs = [self.rollout.sync_weights(engine) for _ in range(SYNC_REPS)]

    def call(self, prompts: TensorDict, opts: dict, timed: bool) -> None:
        self.rollout.wake_up()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        _sync()
        start = time.perf_counter()
        out = self.rollout.generate(prompts, **opts)
        _sync()
        seconds = time.perf_counter() - start
        self.rollout.sleep()
        if timed:
            self.times.append(seconds)
            self.out = out
            if torch.cuda.is_available():
                self.peak_gb = max(self.peak_gb, torch.cuda.max_memory_allocated() / 1e9)
        rows, length = out["responses"].shape
        if length != opts["max_new_tokens"] or not bool(out["response_mask"].all()):
            raise RuntimeError(f"backend {self.name!r}: ignore_eos=True must give {rows} full responses of "
                               f"{opts['max_new_tokens']} tokens, got {list(out['responses'].shape)} with "
                               f"{int(out['response_mask'].sum())} unmasked tokens")


def summarize(bench: Bench, first: Bench, engine, opts: dict) -> dict:
    times = sorted(bench.times)
    median = statistics.median(times)
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    tokens = int(bench.out["response_mask"].sum())
    temperature = float(opts["temperature"]) if opts["do_sample"] and opts["temperature"] > 0 else 1.0
    mask = bench.out["response_mask"].bool()
    trainer = engine.forward(bench.out, temperature=temperature)["log_probs"].float().cpu()
    gap = (bench.out["rollout_log_probs"] - trainer).abs()[mask]
    result = {"backend": bench.name, "times_s": bench.times, "median_s": median, "p90_s": p90,
              "generated_tokens": tokens, "tokens_per_s": tokens / median, "setup_s": bench.setup_s,
              "logprob_gap_max": float(gap.max()), "logprob_gap_mean": float(gap.mean())}
    first_median = statistics.median(first.times)
    result["speedup_vs_first"] = first_median / median
    syncs = [m for m in bench.syncs if "rollout/weight_sync_s" in m]
    if syncs:
        result["weight_sync_s"] = statistics.median(m["rollout/weight_sync_s"] for m in syncs)
        result["weight_sync_mb"] = syncs[-1]["rollout/weight_sync_mb"]
        result["weight_sync_peak_extra_mb"] = max(m["rollout/weight_sync_peak_extra_mb"] for m in syncs)
    if not opts["do_sample"]:
        same = (bench.out["responses"] == first.out["responses"]).all(-1)
        result["greedy_rows_equal_first"] = float(same.float().mean())
    if torch.cuda.is_available():
        result["peak_memory_gb"] = bench.peak_gb
    return result


def format_table(report: dict) -> str:
    meta = report["meta"]
    lines = [f"Rollout throughput on {meta['device']} ({meta['dtype']}): {meta['rows']} rows = {meta['prompts']} "
             f"prompts x {meta['n']}, {meta['prompt_length']} prompt + {meta['response_length']} new tokens "
             f"(ignore_eos); model {meta['params'] / 1e6:.2f}M params; {meta['reps']} timed calls after "
             f"{meta['warmup']} warm-up, {meta['order']}.", "",
             "| backend | median s | p90 s | generated tokens/s | vs " + report["results"][0]["backend"]
             + " | max abs(logp - trainer) | greedy rows equal | weight sync s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        equal = r.get("greedy_rows_equal_first")
        lines.append(f"| {r['backend']} | {r['median_s']:.3f} | {r['p90_s']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{r['speedup_vs_first']:.2f}x | {r['logprob_gap_max']:.2e} | "
                     f"{'-' if equal is None else f'{100 * equal:.0f}%'} | "
                     f"{'-' if r.get('weight_sync_s') is None else format(r['weight_sync_s'], '.4f')} |")
    lines += ["", f"- load average (1 min) before/after: {meta['loadavg_1m_before']:.2f} / "
                  f"{meta['loadavg_1m_after']:.2f} on {meta['cpu_count']} CPUs, "
                  f"{meta['torch_threads']} torch thread(s)"]
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rollout_throughput",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="hf,static",
                        help="comma-separated ROLLOUT_BACKENDS names (default hf,static)")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"benchmark YAML (default {DEFAULT_CONFIG})")
    parser.add_argument("--reps", type=int, help="timed calls per backend (default: the config's steps)")
    parser.add_argument("--warmup", type=int, help="untimed calls per backend first (default: warmup_steps)")
    parser.add_argument("--sequential", action="store_true", help="one backend at a time, freed before the next")
    parser.add_argument("--out", help="write every number as JSON to this file")
    parser.add_argument("--run-dir", help="holds the random checkpoint (default: a fresh temporary directory)")
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads")
    return parse_with_overrides(parser, argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table, write ``--out``; returns the JSON-able report."""
    from hybridflow.trainer.settings import rl_settings
    from hybridflow.workers.roles.common import build_engine
    from hybridflow.workers.rollout import ROLLOUT_BACKENDS

    argv = sys.argv[1:] if argv is None else list(argv)
    args, overrides = parse_args(argv)
    names = names_from(args.backends, ROLLOUT_BACKENDS, "--backends")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    cfg = load_bench_config(args.config, "grpo", overrides)
    warmup = int(cfg.warmup_steps if args.warmup is None else args.warmup)
    reps = int(cfg.steps if args.reps is None else args.reps)
    if reps < 1 or warmup < 0:
        raise SystemExit(f"need --reps >= 1 and --warmup >= 0, got {reps}, {warmup}")
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="rollout_throughput_"))
    run_dir.mkdir(parents=True, exist_ok=True)
    loadavg_before = os.getloadavg()[0]
    counts = build_checkpoint(OmegaConf.to_container(cfg.shape, resolve=True), run_dir / "ckpt", int(cfg.seed))
    rows, length, new = int(cfg.data.batch_size), int(cfg.prompt_length), int(cfg.response_length)
    cfg = apply_overrides(cfg, [f"model.path={run_dir / 'ckpt'}", f"rollout.max_new_tokens={new}",
                                "rollout.ignore_eos=true", f"data.max_prompt_length={length}"])
    settings = rl_settings(cfg, check_data=False)  # the prompts are random ids
    engine = build_engine(str(run_dir / "ckpt"), settings.actor, seed=settings.seed)
    prompts = make_prompts(rows, length, int(cfg.shape.vocab_size), int(cfg.seed))
    opts = {k: cfg.rollout[k] for k in SAMPLING}
    opts.update(n=int(cfg.rollout.n), max_new_tokens=new, ignore_eos=True, seed=int(cfg.seed))

    benches = []
    if args.sequential:
        for name in names:
            bench = Bench(name, engine, settings)
            for i in range(warmup + reps):
                bench.call(prompts, opts, timed=i >= warmup)
            bench.rollout = None  # free its memory before the next backend
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            benches.append(bench)
    else:
        benches = [Bench(name, engine, settings) for name in names]
        for i in range(warmup + reps):
            for bench in benches:
                bench.call(prompts, opts, timed=i >= warmup)
        for bench in benches:
            print(f"[rollout_throughput] {bench.name}: {', '.join(f'{t:.3f}' for t in bench.times)} s",
                  file=sys.stderr)

    results = [summarize(bench, benches[0], engine, opts) for bench in benches]
    meta = {
        "command": " ".join(["python -m benchmarks.rollout_throughput"] + argv), "backends": names,
        "config": OmegaConf.to_container(cfg, resolve=True), "device": str(engine.device) + (
            f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
        "dtype": str(next(iter(engine.module.parameters())).dtype).replace("torch.", "") + " params, "
                 + str(engine.config.torch_dtype(engine.device)).replace("torch.", "") + " compute",
        "prompts": rows, "n": int(cfg.rollout.n), "rows": rows * int(cfg.rollout.n), "prompt_length": length,
        "response_length": new, "sampling": {k: v for k, v in opts.items()}, "warmup": warmup, "reps": reps,
        "order": "sequential" if args.sequential else "interleaved", **counts,
        **machine_meta(loadavg_before), "run_dir": str(run_dir),
    }
    report = {"meta": meta, "results": results}
    print(format_table(report))
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
