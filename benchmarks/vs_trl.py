"""hybridflow's GRPO step against TRL's GRPOTrainer, side by side on one machine.

Both train the quick start's SFT-warmed tiny model on its digit-reversal task with the same
config: ``--prompts`` prompts × ``--n`` samples per step, at most ``--max-new-tokens`` new tokens,
lr ``--lr`` (constant), no KL, token-mean loss, fp32, ``--threads`` torch threads, one optimizer
step per batch, exact-match reward. For each seed both run at once, in two processes that take
turns of ``--turn-steps`` steps (A B A B ..., benchmarks/lockstep.py): only one computes at a time,
and a slow spell of a shared machine hits the steps of both alike. Who steps first flips from pair to pair.
TRL runs in the Python of a throwaway environment that has it (``--trl-python``; it is never a
dependency of hybridflow). Reported:

- step time: median and interquartile range after ``--warmup`` steps (ours: ``timing/step_s``,
  the loop body of recipes/grpo.py; TRL: on_step_begin → on_step_end, which holds its generation,
  reward, loss and optimizer step; the waits for the turn are outside both), and the ratio
  ours / TRL pair by pair;
- tokens/s: prompt + response tokens of a step over its time;
- learning: the training reward of the first and last 10 steps, and the greedy exact-match
  accuracy of the final model on the held-out validation split (plain transformers, the same
  code for both), plus a figure of the reward curves.

Run: ``python -m benchmarks.vs_trl --trl-python /tmp/trlvenv/bin/python [--steps 200] [--seeds 0,1,2]
[--repeats 1] [--backend hf] [--out runs/vs_trl/report.json] [--figure docs/figures/vs_trl.png]``.
Make the TRL environment with ``python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install
torch==2.13.0 trl==1.16.0 transformers==<the one here>``.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def summarize_run(rows: list[dict], warmup: int) -> dict:
    """``rows``: per step ``step_s``, ``reward``, ``tokens``. Medians and spread after ``warmup`` steps."""
    timed = rows[warmup:] or rows
    q1, median, q3 = quartiles([r["step_s"] for r in timed])
    rewards = [r["reward"] for r in rows]
    return {"steps": len(rows), "step_s_median": median, "step_s_q1": q1, "step_s_q3": q3,
            "tokens_per_s": statistics.median(r["tokens"] / r["step_s"] for r in timed),
            "reward_first10": statistics.fmean(rewards[:10]), "reward_last10": statistics.fmean(rewards[-10:]),
            "rewards": rewards}


def compare(pairs: list[dict]) -> dict:
    """``pairs``: per run pair ``{"seed", "trl": summary, "ours": summary}`` → the ratios ours / TRL."""
    ratios = [p["ours"]["step_s_median"] / p["trl"]["step_s_median"] for p in pairs]
    return {"ratio_per_pair": ratios, "ratio_median": statistics.median(ratios),
            "greedy_accuracy": {side: [p[side].get("greedy_accuracy") for p in pairs] for side in ("trl", "ours")}}


def trl_command(python: str, model: str, data: dict, seed: int, args, out: Path) -> list[str]:
    return [python, str(ROOT / "benchmarks" / "trl_grpo.py"), "--model", model, "--train", data["train"],
            "--steps", str(args.steps), "--seed", str(seed), "--prompts", str(args.prompts), "--n", str(args.n),
            "--max-new-tokens", str(args.max_new_tokens), "--lr", str(args.lr), "--threads", str(args.threads),
            "--out", str(out / "steps.jsonl"), "--save", str(out / "hf")]


def trl_result(out: Path, warmup: int) -> dict:
    lines = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    rows, wall = [r for r in lines if "step_s" in r], lines[-1]["train_wall_s"]
    previous = 0.0
    for row in rows:  # TRL logs the running count of prompt + completion tokens
        row["tokens"], previous = row["num_tokens"] - previous, row["num_tokens"]
    return {**summarize_run(rows, warmup), "wall_s_per_step": wall / len(rows), "model": str(out / "hf")}


def our_command(model: str, data: dict, seed: int, args, out: Path) -> list[str]:
    return [sys.executable, str(ROOT / "recipes" / "grpo.py"), f"model.path={model}", f"data.train={data['train']}",
            f"data.val={data['val']}", f"data.batch_size={args.prompts}", f"rollout.n={args.n}",
            f"rollout.max_new_tokens={args.max_new_tokens}", f"rollout.backend={args.backend}", f"actor.lr={args.lr}",
            "actor.use_kl_loss=false", "actor.loss_agg_mode=token-mean", f"trainer.steps={args.steps}", f"seed={seed}",
            f"trainer.run_dir={out}", "trainer.val_every=0", "trainer.val_before_train=false", "trainer.resume=never",
            "trainer.plot=false", "trainer.export_hf=true", "trainer.trackers=[jsonl]",
            f"trainer.callbacks=[{ROOT / 'benchmarks' / 'lockstep.py'}:Lockstep]", *args.overrides]


def our_result(out: Path, warmup: int) -> dict:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [{"step_s": r["timing/step_s"], "reward": r["reward/mean"], "tokens": r["throughput/total_tokens"]}
            for r in lines if "timing/step_s" in r]
    return {**summarize_run(rows, warmup), "model": str(out / "hf"),
            "old_log_prob_from_update": bool(lines[-1].get("actor/old_log_prob_from_update"))}


def run_pair(python: str, model: str, data: dict, seed: int, first: str, args, runs: Path) -> dict:
    """TRL and ours in two processes at once, taking turns step by step (benchmarks/lockstep.py):
    ``first`` steps first, then the other, and so on."""
    from benchmarks.lockstep import Turns

    outs = {side: runs / f"{side}_{seed}_{first}" for side in ("trl", "ours")}
    for out in outs.values():
        out.mkdir(parents=True, exist_ok=True)
    turns = Turns(str(runs / f"lockstep_{seed}_{first}"), (first, "ours" if first == "trl" else "trl"))
    commands = {"trl": trl_command(python, model, data, seed, args, outs["trl"]),
                "ours": our_command(model, data, seed, args, outs["ours"])}
    logs = {side: open(outs[side] / "stdout.log", "w") for side in commands}
    procs = {side: subprocess.Popen(commands[side], env={**_env(args), **turns.env(side)}, stdout=logs[side],
                                    stderr=subprocess.STDOUT) for side in commands}
    try:
        turns.run(args.steps, procs, per_turn=args.turn_steps)
        for side, proc in procs.items():
            if proc.wait(timeout=600):
                raise RuntimeError(f"{side} run (seed {seed}) failed: see {outs[side] / 'stdout.log'}:\n"
                                   f"{(outs[side] / 'stdout.log').read_text()[-4000:]}")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        for log in logs.values():
            log.close()
    return {"trl": trl_result(outs["trl"], args.warmup), "ours": our_result(outs["ours"], args.warmup)}


def _env(args) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}


def draw(pairs: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from hybridflow.trainer.plots import ema

    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.subplots()
    for i, pair in enumerate(p for p in pairs if p["repeat"] == 0):  # one curve per seed and side
        for side, style in (("ours", "-"), ("trl", "--")):
            values = pair[side]["rewards"]
            label = f"{'hybridflow' if side == 'ours' else 'TRL GRPOTrainer'} seed {pair['seed']}"
            ax.plot(range(1, len(values) + 1), ema(values, 0.9), style, color=f"C{i}", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training reward (exact match, EMA 0.9)")
    ax.set_title("GRPO on the quick start's task: hybridflow vs TRL, same config")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=110)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trl-python", required=True, help="the Python of an environment that has trl")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing of each run")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every seed (the order flips each time)")
    parser.add_argument("--turn-steps", type=int, default=10, help="steps of one side before the other's turn")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="hf", help="our rollout.backend")
    parser.add_argument("--quickstart", default="runs/quickstart")
    parser.add_argument("--runs", default="runs/vs_trl")
    parser.add_argument("--out", default=None, help="the JSON report (default: <runs>/report.json)")
    parser.add_argument("--figure", default=None, help="the reward curves (default: <runs>/vs_trl.png)")
    args, args.overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    quick = runpy.run_path(str(ROOT / "recipes" / "quickstart.py"))
    overrides = dict(o.split("=", 1) for o in quick["prepare"](args.quickstart))
    model, data = overrides["model.path"], {"train": overrides["data.train"], "val": overrides["data.val"]}
    runs, load_before = Path(args.runs), os.getloadavg()[0]
    pairs = []
    for repeat in range(args.repeats):
        for i, seed in enumerate(int(s) for s in args.seeds.split(",")):
            first = "trl" if (i + repeat) % 2 == 0 else "ours"  # who steps first flips from pair to pair
            pair = {"seed": seed, "repeat": repeat, "first": first,
                    **run_pair(args.trl_python, model, data, seed, first, args, runs)}
            for side in ("trl", "ours"):
                pair[side]["greedy_accuracy"] = quick["greedy_accuracy"](pair[side]["model"], data["val"])
            pairs.append(pair)
            t, o = pair["trl"], pair["ours"]
            print(f"seed {seed} (repeat {repeat}, {first} first): step median TRL {t['step_s_median'] * 1e3:.1f} ms, "
                  f"ours {o['step_s_median'] * 1e3:.1f} ms (ratio {o['step_s_median'] / t['step_s_median']:.2f}); "
                  f"reward last 10 TRL {t['reward_last10']:.3f}, ours {o['reward_last10']:.3f}; greedy accuracy "
                  f"TRL {t['greedy_accuracy']:.3f}, ours {o['greedy_accuracy']:.3f}", flush=True)
    report = {"config": {k: getattr(args, k) for k in ("steps", "warmup", "prompts", "n", "max_new_tokens", "lr",
                                                        "threads", "backend", "repeats", "turn_steps", "overrides")},
              "loadavg_1m_before": load_before, "loadavg_1m_after": os.getloadavg()[0], "pairs": pairs,
              "summary": compare(pairs)}
    out = Path(args.out or runs / "report.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    draw(pairs, Path(args.figure or runs / "vs_trl.png"))
    print(f"median ratio ours/TRL {report['summary']['ratio_median']:.2f}; report {out}")
    return report


if __name__ == "__main__":
    main()
