"""RLOO — REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE
Style Optimization for Learning from Human Feedback in LLMs").

    for each batch of prompts:
        responses   ← actor.generate(prompts, n ≥ 2 samples each)                # rollout
        r_i         ← reward(prompt, response_i) − β·Σ_t KL_t(actor ‖ ref)         # KL in the reward
        A_i         ← r_i − mean_{j ≠ i} r_j        (the other samples of the same prompt)
        actor.update: PPO-clip(ratio, A)   (REINFORCE −A_i·log π(response_i) while ratio ≈ 1)

Run: ``python recipes/rloo.py [--config FILE] key=value ...`` (defaults: recipes/rloo.yaml).
"""
import os
import sys

from hybridflow.config import parse_cli
from hybridflow.trainer.build import build_workers
from hybridflow.trainer.rl import compute_advantages
from hybridflow.trainer.run import RLRun


def main(argv=None):
    cfg = parse_cli(sys.argv[1:] if argv is None else argv, os.path.join(os.path.dirname(__file__), "rloo.yaml"))
    run = RLRun(cfg)                                   # config checks, data, run dir, trackers
    actor, ref, reward = build_workers(cfg, "actor", "ref", "reward")  # colocated: one process per rank
    run.attach(actor=actor, ref=ref, reward=reward)

    for batch in run.batches():
        with run.stage("gen"):
            batch = actor.generate(batch)              # n samples per prompt, uids shared per prompt
        with run.stage("reward"):
            batch.union(reward.compute_rewards(batch))
        with run.stage("old_log_prob"):
            batch.union(actor.compute_log_prob(batch))
        with run.stage("ref"):
            batch.union(ref.compute_ref_log_prob(batch))
        with run.stage("adv"):
            adv_metrics = compute_advantages(batch, cfg.algorithm, run.kl_ctrl)  # r − β·KL, leave-one-out
        with run.stage("update_actor"):
            update = actor.update(batch)
        run.end_step(batch, adv_metrics, update)
    run.finish()
    return run


if __name__ == "__main__":
    main()
