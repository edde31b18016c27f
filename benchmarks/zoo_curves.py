"""Reward curves of every RL recipe on the quick start's task, on one figure.

Each recipe of :data:`ZOO` runs with the ``inprocess`` executor for the same number of steps,
from the quick start's half-trained SFT model (``recipes/quickstart.py``: built once under
``--quickstart``), with its own YAML otherwise. The script writes, under ``--out``:

- ``zoo_rewards.png``: the training reward of every recipe against the step (EMA-smoothed, raw
  curve underneath);
- ``zoo_rewards.json``: ``{"steps", "seed", "recipes": {label: {"script", "metric", "step",
  "value", "first5", "last5", "wall_s"}}}``, the curves drawn.

The plotted metric is ``reward/mean`` (the exact match), except for DAPO, whose ``reward/mean`` is
over the groups its filter kept: its curve is ``dapo/gen_score/mean``, the score of every sample
it generated; and PPO with a reward model (trained first by recipes/reward_model.py), whose reward
is the model's score: its curve is the exact match it logs beside (benchmarks/zoo_reward.py).

Run: ``python -m benchmarks.zoo_curves [--steps 40] [--only grpo,ppo] [--out docs/figures]
[--runs runs/zoo] [--keep-going] [--plot-only] [key=value ...]``; the ``key=value`` overrides go to every recipe (e.g.
``model.path=...``, which skips the quick start's preparation).
"""
from __future__ import annotations

import argparse
import json
import runpy
import sys
import time
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hybridflow.trainer.plots import ema
from hybridflow.trainer.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]

def variant(name: str) -> tuple:
    """A config of the GRPO dataflow: recipes/grpo.py with recipes/<name>.yaml (``hybridflow <name>``)."""
    return "recipes/grpo.py", ["--config", f"{ROOT}/recipes/{name}.yaml"], "reward/mean"


# The zoo, in one place: label → (script relative to the repository, extra arguments, plotted
# metric[, setup]). ``setup(runs_dir, common_overrides) -> more overrides`` prepares what the recipe
# needs first (a reward model). A script that does not exist (yet) is skipped with a note.
ZOO = {
    "grpo": ("recipes/grpo.py", [], "reward/mean"),
    "ppo": ("recipes/ppo.py", [], "reward/mean"),
    "rloo": variant("rloo"),
    "reinforce_pp": variant("reinforce_pp"),
    "remax": ("recipes/remax.py", [], "reward/mean"),
    "dr_grpo": variant("dr_grpo"),
    "gspo": variant("gspo"),
    "ctpo": variant("ctpo"),
    "dapo": ("recipes/dapo.py", [], "dapo/gen_score/mean"),
    "safe_rlhf": ("recipes/safe_rlhf.py", [], "reward/mean"),
    "ppo_rm": ("recipes/ppo.py", ["--config", f"{ROOT}/recipes/ppo_rm.yaml",
                                  f"reward.function={ROOT}/benchmarks/zoo_reward.py:exact_match_logged"],
               "reward/exact_match/mean", "reward_model"),
    "passk_grpo": ("examples/passk_grpo.py", [], "reward/mean"),
}


def setup_reward_model(runs: Path, common: list[str]) -> list[str]:
    """Train the Bradley–Terry reward model of the quick start's task (recipes/reward_model.py with
    its YAML, on the task's preference pairs as docs/recipes.md makes them); PPO scores with it alone."""
    from hybridflow.trainer.tasks import make_reverse_pairs

    if not (ROOT / "recipes" / "reward_model.py").is_file():
        raise FileNotFoundError("recipes/reward_model.py does not exist")
    model = next(o.split("=", 1)[1] for o in common if o.startswith("model.path="))
    data = next(o.split("=", 1)[1] for o in common if o.startswith("data.train="))
    pairs = make_reverse_pairs(Path(data).parent / "pairs", n_train=8000, n_val=256)
    run_dir = runs / "reward_model"
    runpy.run_path(str(ROOT / "recipes" / "reward_model.py"))["main"]([
        f"model.path={model}", f"data.train={pairs['train']}", f"data.val={pairs['val']}",
        f"trainer.run_dir={run_dir}"])
    return [f"reward.model_path={run_dir / 'hf'}"]


SETUPS = {"reward_model": setup_reward_model}


def run_one(label: str, steps: int, seed: int, runs: Path, common: list[str]) -> dict:
    """Run one recipe in this process; return its curve."""
    script, extra, metric, *setup = ZOO[label]
    run_dir = runs / label
    t0 = time.perf_counter()
    if setup:
        extra = [*extra, *SETUPS[setup[0]](runs, common)]
    run = runpy.run_path(str(ROOT / script))["main"]([
        *extra, *common, f"trainer.steps={steps}", f"seed={seed}", f"trainer.run_dir={run_dir}",
        "trainer.val_every=0", "trainer.val_before_train=false", "trainer.resume=never", "trainer.plot=false"])
    run.close()
    wall = time.perf_counter() - t0
    rows = [r for r in read_metrics(run_dir) if metric in r]
    if not rows:
        raise RuntimeError(f"{label}: {run_dir}/metrics.jsonl has no {metric!r}")
    values = [float(r[metric]) for r in rows]
    return {"script": script, "metric": metric, "step": [int(r["step"]) for r in rows], "value": values,
            "first5": sum(values[:5]) / len(values[:5]), "last5": sum(values[-5:]) / len(values[-5:]),
            "wall_s": round(wall, 1)}


LEGEND = {"dapo": "dapo (all generated samples)", "ppo_rm": "ppo_rm (trained on its reward model's score)"}


def draw(curves: dict, out: Path, steps: int, smooth: float = 0.6) -> Path:
    fig = Figure(figsize=(9.6, 5.0), layout="constrained")
    ax = fig.subplots()
    for i, (label, curve) in enumerate(curves.items()):
        color, style = f"C{i % 10}", "-" if i < 10 else "--"  # 10 colours, then dashed lines
        ax.plot(curve["step"], curve["value"], alpha=0.15, linewidth=1, color=color, linestyle=style)
        ax.plot(curve["step"], ema(curve["value"], smooth), linewidth=1.8, color=color, linestyle=style,
                label=LEGEND.get(label, label))
    ax.set_xlabel("step")
    ax.set_ylabel("exact match of the step's samples")
    ax.set_title(f"The recipes on the quick start's digit reversal: {steps} steps from the SFT warm-up")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, format="png", dpi=120)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="steps per recipe (the same for all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=None, help=f"comma-separated labels (default: all of {', '.join(ZOO)})")
    parser.add_argument("--out", default="docs/figures", help="directory of zoo_rewards.png / .json")
    parser.add_argument("--runs", default="runs/zoo", help="run directories, one per recipe")
    parser.add_argument("--quickstart", default="runs/quickstart", help="where the quick start's model and data are")
    parser.add_argument("--keep-going", action="store_true", help="leave a failing recipe out instead of stopping")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON in --out, run nothing")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    if args.plot_only:
        report = json.loads((out / "zoo_rewards.json").read_text())
        print(f"zoo_curves: {draw(report['recipes'], out / 'zoo_rewards.png', report['steps'])}")
        return report
    bad = [o for o in overrides if "=" not in o]
    if bad:
        parser.error(f"unknown arguments {bad} (overrides are key=value)")
    labels = list(ZOO) if args.only is None else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [lab for lab in labels if lab not in ZOO]
    if unknown:
        parser.error(f"--only: unknown recipe(s) {unknown}; known: {', '.join(ZOO)}")
    if not any(o.startswith("model.path=") for o in overrides):  # the quick start's SFT-warmed model and data
        prepare = runpy.run_path(str(ROOT / "recipes" / "quickstart.py"))["prepare"]
        overrides = [*prepare(args.quickstart), *overrides]
    curves, t0 = {}, time.perf_counter()
    for label in labels:
        if not (ROOT / ZOO[label][0]).is_file():
            print(f"zoo_curves: skipping {label}: {ZOO[label][0]} does not exist")
            continue
        try:
            curves[label] = run_one(label, args.steps, args.seed, Path(args.runs), overrides)
        except Exception as err:  # noqa: BLE001 - reported, and fatal unless --keep-going
            if not args.keep_going:
                raise
            print(f"zoo_curves: {label} FAILED, left out of the figure: {type(err).__name__}: {err}", flush=True)
            continue
        c = curves[label]
        print(f"zoo_curves: {label}: {c['metric']} first 5 {c['first5']:.3f} → last 5 {c['last5']:.3f} "
              f"({c['wall_s']:.0f} s)", flush=True)
    report = {"steps": args.steps, "seed": args.seed, "wall_s": round(time.perf_counter() - t0, 1), "recipes": curves}
    out.mkdir(parents=True, exist_ok=True)
    (out / "zoo_rewards.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"zoo_curves: {draw(curves, out / 'zoo_rewards.png', args.steps)} ({report['wall_s']:.0f} s in all)")
    return report


if __name__ == "__main__":
    main()
