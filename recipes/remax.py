"""ReMax (Li et al. 2023, "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method
for Aligning Large Language Models"): REINFORCE whose baseline is the reward of the greedy answer.

    for each batch of prompts:
        ā_x       ← actor.generate(x, n = 1, greedy)                 # one extra rollout per prompt
        b_x       ← reward(x, ā_x)                                   # the baseline: no critic, no group
        responses ← actor.generate(x, n samples)                     # n = 1 (remax.yaml) is enough
        r_i       ← reward(x, response_i) − β·Σ_t KL_t(actor ‖ ref)
        A_i       ← r_i − b_x
        actor.update: PPO-clip(ratio, A)                             # REINFORCE while ratio ≈ 1

Run: ``python recipes/remax.py [--config FILE] key=value ...`` (defaults: recipes/remax.yaml).
"""
import os
import sys

import torch

from hybridflow.config import parse_cli
from hybridflow.trainer.rl import compute_advantages, sample_and_score
from hybridflow.trainer.run import RLRun
from hybridflow.workers import build_workers


def main(argv=None):
    cfg = parse_cli(sys.argv[1:] if argv is None else argv, os.path.join(os.path.dirname(__file__), "remax.yaml"))
    run = RLRun(cfg)
    actor, ref, reward = build_workers(run.settings, "actor", "ref", "reward")
    run.attach(actor=actor, ref=ref, reward=reward)

    for step in run.steps():
        with step.stage("gen_greedy"):
            greedy = step.prompts.copy()
            greedy.meta_info.update(n=1, do_sample=False)  # per-call sampling override
            greedy = actor.generate(greedy)
        batch = sample_and_score(step, actor, reward)      # stages gen, reward, old_log_prob
        with step.stage("reward"):                         # the baseline: b_x = reward of the greedy answer
            greedy_scores = reward.compute_rewards(greedy).batch["token_level_scores"].sum(-1)
            by_prompt = dict(zip(greedy.non_tensor_batch["uid"], greedy_scores.tolist()))
            baseline = torch.tensor([by_prompt[uid] for uid in batch.non_tensor_batch["uid"]])  # [B]
        with step.stage("ref"):
            batch.union(ref.compute_ref_log_prob(batch))
        with step.stage("adv"):
            adv_metrics = compute_advantages(batch, run.settings.algorithm, run.kl_ctrl, baseline_scores=baseline)
        with step.stage("update_actor"):
            update = actor.update(batch)
        step.log(batch, adv_metrics, {"remax/greedy_reward/mean": greedy_scores.mean()}, update)
    return run.finish()


if __name__ == "__main__":
    main()
