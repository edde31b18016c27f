"""Actor-update throughput of the FSDP2 engine: padded micro-batches vs ``remove_padding``.

    python -m benchmarks.engine_update [--config benchmarks/configs/cpu-small.yaml] [--rows 64]
        [--prompt-length P] [--response-length R] [--micro-batch-size 16] [--steps 3]
        [--gradient-checkpointing] [--variants padded,packed] [--rounds 1] [--peak-tflops X] [--out FILE.json]
        [engine_key=value ...]

The model is the config's ``shape`` (random weights, as in benchmarks/rlhf_step.py). The batch is
what an RL step trains on once responses stop at EOS: ``rows`` prompts of ``P/2 .. P`` tokens
(left-padded) and responses of ``1 .. R`` tokens (right-padded), lengths drawn uniformly with a
fixed seed, so about half of the ``[rows, P+R]`` grid is padding. Each variant (same weights, same
batch, same micro-batch rows) runs 1 untimed and ``--steps`` timed ``train_batch`` calls with a
token-mean ``-log p`` loss, side by side in one process:

* ``padded``: micro-batches of ``[rows, P+R]`` (columns without a real token trimmed);
* ``packed``: ``remove_padding=True`` — the real tokens of a micro-batch in one sequence;
* ``packed_flex``: ``packed`` with ``attn_implementation=flex_attention``, whose block-sparse
  document mask skips the attention between packed sequences (GPU only: torch's flex attention
  has no backward on CPU);
* ``compiled`` / ``packed_flex_compiled``: ``padded`` / ``packed_flex`` with ``compile=True``
  (each decoder layer's forward through ``torch.compile``; the untimed first call compiles);
* ``lora8`` / ``lora32``: ``padded`` training LoRA adapters of rank 8 / 32 on every linear layer
  (the ``lora`` extra); the base weights get no gradient and no optimizer state.

``--rounds k`` runs the variants k times in turn (A B A B ...) and reports each variant's median
over rounds, so that a machine's slow phase hits every variant alike.

``engine_key=value`` arguments set FSDPEngine options for every variant (e.g.
``max_tokens_per_micro_batch=8192 dtype=bfloat16``). Reported per variant: seconds per update,
real tokens/s (``attention_mask.sum()`` / time), the update's MFU ``6·N·real tokens / time /
peak`` (N as in rlhf_step: matmul parameters incl. the LM head; the peak from ``--peak-tflops``, a
known GPU, or a fp32 matmul measured here on CPU), and the speed-up of each variant over the
first; and the training state the update holds: trainable parameters, their gradients and the
AdamW moments in MB (exact, the same on any device), plus the measured peak: on GPU the peak
allocated memory of the updates, on Linux CPU the peak RSS above the RSS before the engine was
built (``peak_rss_gain_gib``: weights, training state, activations and allocator slack). Only the ratios of times are meaningful on a shared CPU.
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

from typing import Optional

import torch
import yaml
from omegaconf import OmegaConf
from tensordict import TensorDict

from benchmarks.cli import machine_meta, names_from, parse_with_overrides, write_report
from benchmarks.rlhf_step import build_checkpoint, device_peak
from hybridflow.config import load_config

VARIANTS = {"padded": {}, "packed": {"remove_padding": True},
            "packed_flex": {"remove_padding": True, "attn_implementation": "flex_attention"},
            "compiled": {"compile": True},
            "packed_flex_compiled": {"remove_padding": True, "attn_implementation": "flex_attention", "compile": True},
            "lora8": {"lora_rank": 8, "lora_alpha": 16.0}, "lora32": {"lora_rank": 32, "lora_alpha": 64.0}}


def make_batch(rows: int, prompt_length: int, response_length: int, vocab: int, seed: int = 0) -> TensorDict:
    """Left-padded prompts of ``P/2 .. P`` and right-padded responses of ``1 .. R`` random tokens."""
    gen = torch.Generator().manual_seed(seed)
    p_len = torch.randint(max(1, prompt_length // 2), prompt_length + 1, (rows,), generator=gen)
    r_len = torch.randint(1, response_length + 1, (rows,), generator=gen)
    cols = torch.arange(prompt_length + response_length)
    prompt_mask = cols[None, :prompt_length] >= (prompt_length - p_len)[:, None]
    response_mask = cols[None, :response_length] < r_len[:, None]
    attention_mask = torch.cat([prompt_mask, response_mask], 1).long()
    ids = torch.randint(2, vocab, attention_mask.shape, generator=gen) * attention_mask
    return TensorDict({"input_ids": ids, "attention_mask": attention_mask,
                       "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
                       "responses": ids[:, prompt_length:], "response_mask": response_mask.long()},
                      batch_size=[rows])


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def nll(mb, outputs):
    mask = mb["response_mask"]
    loss = -(outputs["log_probs"] * mask).sum() / mask.sum().clamp_min(1)
    return loss, {"loss": loss.detach()}


def _mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 1e6


def _rss_kib(field: str) -> Optional[int]:
    """``VmRSS`` / ``VmHWM`` (peak) of this process in KiB (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith(field + ":")))
    except (OSError, StopIteration):
        return None


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux: ``/proc/self/clear_refs``); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def time_updates(ckpt: str, batch: TensorDict, engine_cfg: dict, steps: int) -> tuple[list, dict]:
    """Seconds of ``steps`` timed ``train_batch`` calls (after one untimed), and the training state."""
    from hybridflow.workers.engines.fsdp import FSDPEngine

    gc.collect()
    rss_before, peak_reset = _rss_kib("VmRSS"), _reset_peak_rss()
    engine = FSDPEngine({"model_path": ckpt, "lr": 1e-6, **engine_cfg})
    cuda = engine.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    for step in range(steps + 1):  # the first call warms up
        if cuda and step == 1:
            torch.cuda.reset_peak_memory_stats()
        sync()
        start = time.perf_counter()
        engine.train_batch(batch, nll)
        sync()
        if step:
            times.append(time.perf_counter() - start)
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    memory = {"trainable_params": sum(p.numel() for p in trainable), "params_mb": _mb(engine.module.parameters()),
              "grads_mb": _mb(p for p in trainable),  # one gradient per trainable parameter, same dtype
              "optimizer_state_mb": _mb(t for state in engine.optimizer.state.values() for t in state.values()
                                        if torch.is_tensor(t) and t.dim() > 0)}
    if cuda:
        memory["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    elif peak_reset and rss_before is not None:  # the variant's own peak: engine build + updates
        memory["peak_rss_gain_gib"] = (_rss_kib("VmHWM") - rss_before) / 2 ** 20
    del engine, trainable
    gc.collect()  # free this variant's model and optimizer before the next one is built
    if cuda:
        torch.cuda.empty_cache()
    return times, memory


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine_update", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="benchmarks/configs/cpu-small.yaml")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--prompt-length", type=int)
    parser.add_argument("--response-length", type=int)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--variants", default="padded,packed", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=1, help="run the variants k times in turn (A B A B)")
    parser.add_argument("--peak-tflops", type=float)
    parser.add_argument("--out")
    args, rest = parse_with_overrides(parser, argv, "engine_key=value")
    args.variants = names_from(args.variants, VARIANTS, "--variants")
    args.engine = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in rest)}
    return args


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    loadavg_before = os.getloadavg()[0]
    cfg = load_config(args.config)
    shape = OmegaConf.to_container(cfg.shape, resolve=True)
    prompt_length = args.prompt_length or int(cfg.prompt_length)
    response_length = args.response_length or int(cfg.response_length)
    ckpt = Path(tempfile.mkdtemp(prefix="engine_update_")) / "ckpt"
    counts = build_checkpoint(shape, ckpt, seed=0)
    batch = make_batch(args.rows, prompt_length, response_length, int(shape["vocab_size"]))
    real = float(batch["attention_mask"].sum())
    peak, peak_source = (args.peak_tflops, "--peak-tflops") if args.peak_tflops else device_peak()
    engine_cfg = {"micro_batch_size": args.micro_batch_size, "gradient_checkpointing": args.gradient_checkpointing,
                  **args.engine}
    runs = {name: [] for name in args.variants}
    for _ in range(args.rounds):
        for name in args.variants:
            runs[name].append(time_updates(str(ckpt), batch, {**engine_cfg, **VARIANTS[name]}, args.steps))
    results = {}
    for name, rounds in runs.items():
        per_round = [sum(times) / len(times) for times, _ in rounds]
        seconds = statistics.median(per_round)
        results[name] = {"update_s": seconds, "rounds_s": per_round, "times_s": [t for times, _ in rounds for t in times],
                         "real_tokens_per_s": real / seconds,
                         "update_mfu": 6 * counts["actor_flop_params"] * real / seconds / (peak * 1e12), **rounds[-1][1]}
    report = {"meta": {"command": " ".join(["python -m benchmarks.engine_update"] + list(argv or sys.argv[1:])),
                       "shape": shape, "rows": args.rows, "prompt_length": prompt_length,
                       "response_length": response_length, "micro_batch_size": args.micro_batch_size,
                       "real_tokens": real, "grid_tokens": float(batch["attention_mask"].numel()),
                       "padding_fraction": 1 - real / batch["attention_mask"].numel(), **counts,
                       "peak_tflops": peak, "peak_source": peak_source, "engine": engine_cfg,
                       "device": device_name(), **machine_meta(loadavg_before)},
              "variants": results}
    first = results[args.variants[0]]["update_s"]
    print(f"| variant | update s | real tokens/s | update MFU | speed-up vs {args.variants[0]} "
          "| trainable params | grads + AdamW MB | peak RSS gain GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        r["speedup"] = first / r["update_s"]
        print(f"| {name} | {r['update_s']:.3f} | {r['real_tokens_per_s']:.0f} | {100 * r['update_mfu']:.2f}% "
              f"| {r['speedup']:.2f}x | {r['trainable_params']:,} | {r['grads_mb'] + r['optimizer_state_mb']:.1f} "
              f"| {r.get('peak_rss_gain_gib', float('nan')):.2f} |")
    print(f"padding: {100 * report['meta']['padding_fraction']:.0f}% of the grid")
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
