"""The quick start: watch GRPO raise a verifiable reward on a CPU in a few minutes.

    1. a tiny Qwen2-style model (random weights) + character tokenizer  → runs/quickstart/base
    2. the digit-reversal task ("40213=" → "31204"), disjoint splits   → runs/quickstart/data
    3. SFT warm-up, stopped half-way on purpose: the first exported      → runs/quickstart/sft/hf
       checkpoint whose greedy validation accuracy reaches 35 %
    4. GRPO (recipes/grpo.py, inprocess executor)                      → runs/quickstart/grpo
       metrics.jsonl, reward_curve.png; prints the reward of the first and last 5 steps.

Run: ``make quickstart`` or ``python recipes/quickstart.py [key=value ...]``; the overrides go to
the GRPO run (e.g. ``executor=ray world_size=2``).
"""
import json
import os
import runpy
import shutil
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hybridflow.trainer.data import PromptDataset
from hybridflow.trainer.rewards import exact_match
from hybridflow.trainer.tasks import make_reverse_data
from hybridflow.trainer.tiny_model import build_tiny_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))


def recipe(name):
    return runpy.run_path(os.path.join(HERE, f"{name}.py"))["main"]


def greedy_accuracy(model_dir, val_file):
    """Exact-match accuracy of greedy answers on the validation prompts (plain transformers)."""
    tokenizer, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    val = PromptDataset(val_file, tokenizer, max_prompt_length=16)
    batch = val.collate([val[i] for i in range(len(val))]).batch
    with torch.no_grad():
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False,
                             max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(exact_match("", t, row["ground_truth"]) for t, row in zip(texts, val.rows)) / len(val)


def warm_up(root, data, target=0.35, every=10):
    """SFT, keeping an HF export every ``every`` steps; the first with greedy accuracy ≥ target wins."""
    recipe("sft")([f"model.path={root}/base", f"data.train={data['sft']}", f"trainer.run_dir={root}/sft_run",
                   f"trainer.export_every={every}"])
    exports = sorted((int(d.rsplit("_", 1)[1]), d) for d in os.listdir(f"{root}/sft_run") if d.startswith("hf_step_"))
    for step, name in exports:
        accuracy = greedy_accuracy(f"{root}/sft_run/{name}", data["val"])
        if accuracy >= target or step == exports[-1][0]:
            print(f"   SFT step {step}: greedy validation accuracy {accuracy:.2f} → the GRPO starting point")
            shutil.copytree(f"{root}/sft_run/{name}", f"{root}/sft/hf", dirs_exist_ok=True)
            return


def prepare(root="runs/quickstart"):
    """Steps 1-3; returns the overrides that point a recipe at the warmed model and the data."""
    print("1/4 tiny model:", build_tiny_checkpoint(f"{root}/base"))
    data = make_reverse_data(f"{root}/data", n_train=4000, n_val=256, n_sft=4000, length=5)
    print("2/4 data:", data)
    if not os.path.isfile(f"{root}/sft/hf/config.json"):
        print("3/4 SFT warm-up")
        warm_up(root, data)
    return [f"model.path={root}/sft/hf", f"data.train={data['train']}", f"data.val={data['val']}"]


def main(argv=None, root="runs/quickstart"):
    argv = sys.argv[1:] if argv is None else list(argv)
    overrides = prepare(root)
    print("4/4 GRPO")
    run = recipe("grpo")([*overrides, f"trainer.run_dir={root}/grpo", "trainer.resume=never", *argv])
    rewards = [row["reward/mean"] for row in map(json.loads, open(run.run_dir / "metrics.jsonl"))
               if "reward/mean" in row]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"\nreward/mean: first 5 steps {first:.3f} → last 5 steps {last:.3f} ({last - first:+.3f})")
    print(f"metrics: {run.run_dir / 'metrics.jsonl'}\ncurve:   {run.run_dir / 'reward_curve.png'}")
    return first, last


if __name__ == "__main__":
    main()
