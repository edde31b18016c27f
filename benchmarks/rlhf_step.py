"""Throughput of one RL step (GRPO or PPO) through the real worker groups, per stage.

    python -m benchmarks.rlhf_step [--config benchmarks/configs/tiny.yaml] [--algo grpo|ppo]
                                   [--out FILE.json] [--peak-tflops X] [--run-dir DIR] [key=value ...]

The config (see benchmarks/configs/) gives the model *shape* (a transformers ``Qwen2Config``: random
weights are written with ``save_pretrained`` plus the byte tokenizer of trainer/tiny_model.py into
``<run-dir>/ckpt``), ``prompt_length`` (every prompt is that many random token ids),
``response_length`` (``rollout.max_new_tokens`` with ``rollout.ignore_eos=true``: every response is
exactly that long), ``warmup_steps`` untimed and ``steps`` timed RL steps; every other key is a
recipe key (recipes/base.yaml + grpo.yaml or ppo.yaml) and overrides the recipe's default.

A step makes the calls of recipes/grpo.py (recipes/ppo.py with ``--algo ppo``) on the groups of
``hybridflow.workers.build_workers``: generate, compute_rewards, compute_log_prob,
compute_ref_log_prob, [compute_values], compute_advantages, [critic update], actor update.

Reported (means over the timed steps): seconds per stage and per step; ``tokens_per_s`` = prompt +
response tokens of the step / step time / devices (ranks); ``gen_tokens_per_s`` = generated tokens
/ generation time / devices; model FLOPs utilisation per stage, ``MFU = k·N·tokens / time / devices
/ peak`` with k = 6 for an update (× ppo_epochs) and 2 for a forward or generation, N = the matmul
parameters (no embedding lookup, the LM head counted; attention scores not counted); the peak is
``--peak-tflops``, else 989 TFLOP/s on an H100/H200 (bf16 dense) and on a CPU the best of a fp32
matmul measured on rank 0 before and after the steps (said so in the output; on a shared CPU the
measurement is as noisy as the steps, so a CPU MFU is a rough figure); peak memory per rank
(``torch.cuda.max_memory_allocated`` on GPU, ``ru_maxrss`` of the rank's process on CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import OmegaConf

from benchmarks.cli import machine_meta, parse_with_overrides, write_report
from hybridflow import DataProto, Dispatch, Worker, register
from hybridflow.config import ConfigError, all_keys, apply_overrides, load_config, unknown_key_message

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = "benchmarks/configs/tiny.yaml"
BENCH_KEYS = ("shape", "prompt_length", "response_length", "warmup_steps", "steps")
STAGES = {"grpo": ("gen", "reward", "old_log_prob", "ref", "adv", "update_actor"),
          "ppo": ("gen", "reward", "old_log_prob", "ref", "values", "adv", "update_critic", "update_actor")}
# Dense bf16 peaks (TFLOP/s) by device-name fragment; the first match wins.
KNOWN_PEAKS = (("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("A100", 312.0), ("A800", 312.0),
               ("L40S", 362.0))
GB = 1e9


class ProbeWorker(Worker):
    """Colocated with the roles (same process per rank): reads that process's peak memory."""

    def __init__(self, config=None):
        super().__init__()

    @register(dispatch=Dispatch.ONE_TO_ALL)
    def reset_peak_memory(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    @register(dispatch=Dispatch.ONE_TO_ALL)
    def memory(self) -> dict:
        out = {"pid": os.getpid(), "torch_threads": torch.get_num_threads(),
               "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB}
        if torch.cuda.is_available():
            out.update(device=torch.cuda.get_device_name(),
                       cuda_max_allocated_gb=torch.cuda.max_memory_allocated() / GB,
                       cuda_max_reserved_gb=torch.cuda.max_memory_reserved() / GB)
        return out

    @register(dispatch=Dispatch.ONE_TO_ALL)
    def peak_tflops(self) -> tuple:
        """``(TFLOP/s, how it was found)`` of this rank's device (see :func:`device_peak`)."""
        return device_peak()


# ---------------------------------------------------------------------------------------- config
def load_bench_config(path: str, algo: str, overrides: list[str]):
    """The recipe's YAML, then the benchmark YAML on top (its recipe keys must exist there), then
    the command-line overrides (validated as recipes validate them)."""
    recipe = load_config(str(REPO / "recipes" / f"{algo}.yaml"))
    bench = load_config(path)
    known = all_keys(recipe)
    for key in all_keys(bench):
        if key.split(".")[0] not in BENCH_KEYS and key not in known:
            raise ConfigError(unknown_key_message(key, known, path))
    missing = [k for k in BENCH_KEYS if k not in bench]
    if missing:
        raise ConfigError(f"{path}: benchmark key(s) {missing} missing (see benchmarks/configs/tiny.yaml)")
    cfg = apply_overrides(OmegaConf.merge(recipe, bench), overrides)
    for key in ("prompt_length", "response_length", "steps"):
        if int(cfg[key]) < 1:
            raise ConfigError(f"{key} must be >= 1, got {cfg[key]}")
    return cfg


def resolve_path(spec: str) -> str:
    """``file.py:fn`` relative to the working directory or, failing that, the repository root."""
    if ":" not in spec or spec.startswith("builtin:"):
        return spec
    file, name = spec.rsplit(":", 1)
    found = file if os.path.exists(file) else str(REPO / file)
    return f"{os.path.abspath(found)}:{name}"


def build_checkpoint(shape: dict, out_dir: Path, seed: int) -> dict:
    """Random ``Qwen2ForCausalLM`` of ``shape`` + the byte tokenizer in ``out_dir``; returns the
    parameter counts. Reused when ``out_dir`` already holds a checkpoint of the same shape."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from hybridflow.trainer.tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    if int(shape.get("vocab_size", 0)) < len(tokenizer):
        raise ConfigError(f"shape.vocab_size must be >= {len(tokenizer)} (the byte tokenizer), got "
                          f"{shape.get('vocab_size')}")
    config = Qwen2Config(**shape, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.device("meta"):
        total = sum(p.numel() for p in Qwen2ForCausalLM(config).parameters())
    vocab, hidden = config.vocab_size, config.hidden_size
    non_embedding = total - vocab * hidden * (1 if config.tie_word_embeddings else 2)
    counts = {"params": total, "non_embedding_params": non_embedding,
              "actor_flop_params": non_embedding + vocab * hidden, "critic_flop_params": non_embedding + hidden}
    stamp, wanted = out_dir / "bench_shape.json", {"shape": shape, "seed": seed}
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return counts
    stamp.unlink(missing_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    stamp.write_text(json.dumps(wanted))  # last: a half-written checkpoint is never reused
    return counts


def make_prompts(cfg, step: int) -> DataProto:
    """``data.batch_size`` prompts of exactly ``prompt_length`` random ids (no pad, no EOS)."""
    from hybridflow.trainer.rl import assign_uids

    rows, length = int(cfg.data.batch_size), int(cfg.prompt_length)
    gen = torch.Generator().manual_seed(int(cfg.seed) * 100003 + step)
    ids = torch.randint(2, int(cfg.shape.vocab_size), (rows, length), generator=gen)
    tensors = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
               "position_ids": torch.arange(length).expand(rows, length).clone()}
    non_tensors = {"raw_prompt": [""] * rows, "ground_truth": [None] * rows, "data_source": ["bench"] * rows}
    prompts = DataProto.from_dict(tensors, non_tensors, meta_info={"step": step, "seed": int(cfg.seed) * 100003 + step})
    return assign_uids(prompts, step)


# ---------------------------------------------------------------------------------------- peaks
def measure_matmul_tflops(dtype: torch.dtype, device: str, size: int = 2048, reps: int = 5) -> float:
    """Best-of-``reps`` dense ``size``³ matmul throughput in TFLOP/s."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(reps + 1):  # the first one warms up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e12


def device_peak() -> tuple[float, str]:
    """The dense peak of this process's device: the spec value of a known GPU, else a matmul
    measured here (fp32 on a CPU, with this process's torch threads)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for fragment, value in KNOWN_PEAKS:
            if fragment in name:
                return value, f"{name}: bf16 dense spec"
        return measure_matmul_tflops(torch.bfloat16, "cuda", 8192, 10), f"{name}: measured bf16 8192^3 matmul"
    return (measure_matmul_tflops(torch.float32, "cpu"),
            f"CPU: measured fp32 2048^3 matmul on rank 0, {torch.get_num_threads()} torch thread(s)")


# ---------------------------------------------------------------------------------------- the step
@contextmanager
def stage(timer, name: str, sync: bool):
    with timer(name):
        yield
        if sync:  # in-process on a GPU: count the kernels of this stage, not just their launch
            torch.cuda.synchronize()


def rl_step(groups: dict, batch: DataProto, cfg, algo: str, timer, kl_ctrl, sync: bool) -> DataProto:
    """The loop body of recipes/grpo.py (recipes/ppo.py for ``ppo``), stage by stage; ``cfg``: the
    run's ``algorithm`` settings."""
    from hybridflow.trainer.rl import compute_advantages

    actor, ref, reward, critic = groups["actor"], groups["ref"], groups["reward"], groups.get("critic")
    with stage(timer, "gen", sync):
        batch = actor.generate(batch)
    with stage(timer, "reward", sync):
        batch.union(reward.compute_rewards(batch))
    with stage(timer, "old_log_prob", sync):
        batch.union(actor.compute_log_prob(batch))
    with stage(timer, "ref", sync):
        batch.union(ref.compute_ref_log_prob(batch))
    if algo == "ppo":
        with stage(timer, "values", sync):
            batch.union(critic.compute_values(batch))
    with stage(timer, "adv", sync):
        compute_advantages(batch, cfg, kl_ctrl)
    if algo == "ppo":
        with stage(timer, "update_critic", sync):
            critic.update(batch)
    with stage(timer, "update_actor", sync):
        actor.update(batch)
    return batch


def stage_flops(cfg, algo: str, counts: dict, tokens: float, prompt_tokens: float, gen_tokens: float) -> dict:
    actor, critic = counts["actor_flop_params"], counts["critic_flop_params"]
    flops = {"gen": 2 * actor * (prompt_tokens + gen_tokens), "old_log_prob": 2 * actor * tokens,
             "ref": 2 * actor * tokens, "update_actor": 6 * actor * tokens * int(cfg.actor.ppo_epochs)}
    if algo == "ppo":
        flops.update(values=2 * critic * tokens, update_critic=6 * critic * tokens * int(cfg.critic.ppo_epochs))
    return flops


def summarize(records: list[dict], algo: str, world: int, peak: float) -> dict:
    def total(key):
        return sum(r[key] for r in records)

    stage_s = {s: total(f"{s}_s") / len(records) for s in STAGES[algo]}
    step_s = total("step_s") / len(records)
    mfu = {s: total(f"{s}_flops") / total(f"{s}_s") / world / (peak * 1e12)
           for s in STAGES[algo] if f"{s}_flops" in records[0]}
    return {"step_s": step_s, "tokens_per_s": total("tokens") / total("step_s") / world,
            "gen_tokens_per_s": total("gen_tokens") / total("gen_s") / world,
            "update_mfu": mfu["update_actor"], "stage_s": stage_s,
            "stage_share": {s: v / step_s for s, v in stage_s.items()}, "stage_mfu": mfu}


def format_table(report: dict) -> str:
    meta, summary = report["meta"], report["summary"]
    lines = [f"RL step ({meta['algo']}, {meta['executor']} w{meta['world_size']}, {meta['device']}): "
             f"{meta['rows']} rows = {meta['prompts']} prompts x {meta['n']}, {meta['prompt_length']} prompt + "
             f"{meta['response_length']} response tokens; model {meta['params'] / 1e6:.2f}M params "
             f"({meta['non_embedding_params'] / 1e6:.2f}M non-embedding); {meta['steps']} timed steps after "
             f"{meta['warmup_steps']} warm-up.", "",
             "| stage | mean s | share of step | MFU |", "|---|---:|---:|---:|"]
    for name, seconds in summary["stage_s"].items():
        mfu = summary["stage_mfu"].get(name)
        lines.append(f"| {name} | {seconds:.3f} | {100 * summary['stage_share'][name]:.1f}% | "
                     f"{'-' if mfu is None else f'{100 * mfu:.2f}%'} |")
    lines.append(f"| **step** | **{summary['step_s']:.3f}** | 100% | |")
    each = ", ".join(f"{r['step_s']:.3f}" for r in report["steps"])
    lines += ["", f"- step seconds of each timed step: {each}",
              f"- tokens/s per device (prompt + response): {summary['tokens_per_s']:.1f}",
              f"- generation tokens/s per device: {summary['gen_tokens_per_s']:.1f}",
              f"- update MFU: {100 * summary['update_mfu']:.2f}% of {meta['peak_tflops']:.3g} TFLOP/s "
              f"({meta['peak_source']})",
              f"- peak memory per rank: {summary['peak_memory_gb']:.2f} GB ({meta['memory_kind']})",
              f"- load average (1 min) before/after: {meta['loadavg_1m_before']:.2f} / "
              f"{meta['loadavg_1m_after']:.2f} on {meta['cpu_count']} CPUs"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- main
def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rlhf_step", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"benchmark YAML (default {DEFAULT_CONFIG})")
    parser.add_argument("--algo", choices=sorted(STAGES), default="grpo", help="recipe whose stages run")
    parser.add_argument("--out", help="write every number as JSON to this file")
    parser.add_argument("--peak-tflops", type=float, help="peak FLOP/s per device for MFU (default: see above)")
    parser.add_argument("--run-dir", help="checkpoint + logs (default: a fresh temporary directory)")
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads of the controller process")
    return parse_with_overrides(parser, argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table, write ``--out``; returns the JSON-able report."""
    from hybridflow.trainer.algos import make_kl_controller
    from hybridflow.trainer.metrics import Timer, compute_throughput
    from hybridflow.trainer.settings import rl_settings
    from hybridflow.workers import build_workers

    argv = sys.argv[1:] if argv is None else list(argv)
    args, overrides = parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    cfg = load_bench_config(args.config, args.algo, overrides)
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="rlhf_step_"))
    run_dir.mkdir(parents=True, exist_ok=True)
    loadavg_before = os.getloadavg()[0]
    counts = build_checkpoint(OmegaConf.to_container(cfg.shape, resolve=True), run_dir / "ckpt", int(cfg.seed))
    warmup, steps = int(cfg.warmup_steps), int(cfg.steps)
    cfg = apply_overrides(cfg, [f"model.path={run_dir / 'ckpt'}", f"trainer.run_dir={run_dir}",
                                f"rollout.max_new_tokens={int(cfg.response_length)}", "rollout.ignore_eos=true",
                                f"data.max_prompt_length={int(cfg.prompt_length)}", f"trainer.steps={warmup + steps}"])
    cfg.reward.function = resolve_path(str(cfg.reward.function))
    world = int(cfg.world_size)
    sync = torch.cuda.is_available() and cfg.executor == "inprocess"

    roles = ("actor", "ref", "reward") + (("critic",) if args.algo == "ppo" else ())
    ray_was_running = False
    if cfg.executor == "ray":
        import ray

        ray_was_running = ray.is_initialized()
    setup_start = time.perf_counter()
    settings = rl_settings(cfg, check_data=False)  # the prompts are random ids (make_prompts)
    built = build_workers(settings, *roles, "probe", classes={"probe": ProbeWorker})
    groups = dict(zip(roles + ("probe",), built))
    setup_s = time.perf_counter() - setup_start
    probe = groups["probe"]
    peaks = [args.peak_tflops, "--peak-tflops"] if args.peak_tflops else list(probe.peak_tflops()[0])
    kl_ctrl = make_kl_controller(OmegaConf.to_container(cfg.algorithm.kl_ctrl))
    timer, records = Timer(), []
    try:
        for step in range(1, warmup + steps + 1):
            if step == warmup + 1:
                probe.reset_peak_memory()
            with timer("step"):
                batch = rl_step(groups, make_prompts(cfg, step), settings.algorithm, args.algo, timer, kl_ctrl, sync)
            timing = timer.step_metrics()
            if step <= warmup:
                continue
            record = {k.removeprefix("timing/"): v for k, v in timing.items()}
            tokens = compute_throughput(batch, 1.0, 1)["throughput/total_tokens"]  # attention_mask.sum()
            generated = float(batch.batch["response_mask"].sum())
            record.update(step=step, tokens=tokens, gen_tokens=generated, prompt_tokens=tokens - generated)
            flops = stage_flops(cfg, args.algo, counts, record["tokens"], record["prompt_tokens"], record["gen_tokens"])
            record.update({f"{name}_flops": value for name, value in flops.items()})
            records.append(record)
            print(f"[rlhf_step] step {step - warmup}/{steps}: {record['step_s']:.2f} s", file=sys.stderr, flush=True)
        memory = probe.memory()
        if not args.peak_tflops and peaks[1].startswith("CPU"):  # measured: best of before and after the steps
            after = probe.peak_tflops()[0][0]
            peaks = [max(peaks[0], after), f"{peaks[1]}, best of 5 before and 5 after the steps "
                                            f"({peaks[0]:.3g} / {after:.3g})"]
    finally:
        groups["actor"].shutdown()  # the colocated groups share one handle
        groups["actor"].pool.shutdown()
        if cfg.executor == "ray" and not ray_was_running:
            import ray

            ray.shutdown()

    memory = memory if isinstance(memory, list) else [memory]
    on_gpu = "cuda_max_allocated_gb" in memory[0]
    peak, peak_source = peaks
    summary = summarize(records, args.algo, world, peak)
    summary["peak_memory_gb"] = max(m["cuda_max_allocated_gb" if on_gpu else "max_rss_gb"] for m in memory)
    meta = {
        "command": " ".join(["python -m benchmarks.rlhf_step"] + argv), "algo": args.algo,
        "config": OmegaConf.to_container(cfg, resolve=True), "executor": str(cfg.executor), "world_size": world,
        "device": memory[0].get("device", "cpu"), "prompts": int(cfg.data.batch_size), "n": int(cfg.rollout.n),
        "rows": int(cfg.data.batch_size) * int(cfg.rollout.n), "prompt_length": int(cfg.prompt_length),
        "response_length": int(cfg.response_length), "warmup_steps": warmup, "steps": steps, **counts,
        "peak_tflops": peak, "peak_source": peak_source, "setup_s": setup_s, "memory_per_rank": memory,
        "memory_kind": ("torch.cuda.max_memory_allocated over the timed steps" if on_gpu
                        else "ru_maxrss of the rank's process (whole run)"),
        **machine_meta(loadavg_before), "run_dir": str(run_dir),
    }
    report = {"meta": meta, "summary": summary, "steps": records}
    print(format_table(report))
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    # Import through the package so Ray workers unpickle ProbeWorker by reference, not from __main__.
    from benchmarks.rlhf_step import main as _main

    _main()
