"""TRL's GRPOTrainer on the quick start's task, for benchmarks/vs_trl.py (the peer side).

Runs in a throwaway environment that has ``trl`` (never a dependency of hybridflow; this file
imports nothing from it). Writes one JSON line per optimizer step to ``--out`` (``step``,
``step_s`` = on_step_begin → on_step_end, which holds TRL's generation, reward, loss and optimizer
step, ``reward``, ``num_tokens``: prompt + completion tokens so far) and saves the final model to ``--save`` for the greedy evaluation.

    python benchmarks/trl_grpo.py --model M --train T --steps 200 --seed 0 --out f.jsonl --save DIR
"""
from __future__ import annotations

import argparse
import json
import os
import time


def exact_match(completions, ground_truth, **_):
    """The reward of hybridflow's builtin:exact_match: the stripped completion equals the answer."""
    return [1.0 if str(c).strip() == str(g).strip() else 0.0 for c, g in zip(completions, ground_truth)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True, help="parquet with prompt and ground_truth columns")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    parser.add_argument("--save", required=True)
    args = parser.parse_args()

    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    data = load_dataset("parquet", data_files=args.train, split="train").select_columns(["prompt", "ground_truth"])
    config = GRPOConfig(
        output_dir=os.path.join(args.save, "trainer"), use_cpu=True, bf16=False, fp16=False, seed=args.seed,
        max_steps=args.steps, per_device_train_batch_size=args.prompts * args.n, num_generations=args.n,
        gradient_accumulation_steps=1, num_iterations=1, max_completion_length=args.max_new_tokens,
        temperature=1.0, top_p=1.0, beta=0.0, loss_type="dapo", scale_rewards="group", learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
        save_strategy="no", report_to=[], dataloader_num_workers=0, disable_tqdm=True)

    rows, clock = [], {}
    turns = None
    if os.environ.get("HYBRIDFLOW_LOCKSTEP"):  # take turns with the other side (benchmarks/lockstep.py)
        from lockstep import Lockstep

        turns = Lockstep()

    class Timing(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if turns is not None:
                turns.on_step_begin()
            clock["start"] = time.perf_counter()

        def on_step_end(self, a, state, *rest, **k):
            rows.append({"step": state.global_step, "step_s": time.perf_counter() - clock["start"]})
            if turns is not None:
                turns.on_step_end(final=state.global_step >= args.steps)

        def on_log(self, a, state, control, logs=None, **k):
            if logs and "reward" in logs and rows and rows[-1]["step"] == state.global_step:
                rows[-1].update(reward=float(logs["reward"]), num_tokens=float(logs["num_tokens"]))

    trainer = GRPOTrainer(model=model, reward_funcs=exact_match, args=config, train_dataset=data,
                          processing_class=tokenizer, callbacks=[Timing()])
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    trainer.model.save_pretrained(args.save)
    tokenizer.save_pretrained(args.save)
    with open(args.out, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.write(json.dumps({"train_wall_s": wall}) + "\n")


if __name__ == "__main__":
    main()
