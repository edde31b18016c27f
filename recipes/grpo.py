"""GRPO — Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath").

    for each batch of prompts:
        responses   ← actor.generate(prompts, n samples each)            # rollout
        r           ← reward(prompt, response)                           # verifiable reward
        logp_old    ← actor.log_prob(responses); logp_ref ← ref.log_prob(responses)
        A_i         ← (r_i − mean(r_group)) / std(r_group)               # no critic
        actor.update: PPO-clip(ratio, A) + β·KL_k3(actor ‖ ref)          # KL in the loss

Run: ``python recipes/grpo.py [--config FILE] key=value ...`` (defaults: recipes/grpo.yaml).
"""
import os
import sys

from hybridflow.config import parse_cli
from hybridflow.trainer.build import build_workers
from hybridflow.trainer.rl import compute_advantages
from hybridflow.trainer.run import RLRun


def main(argv=None):
    cfg = parse_cli(sys.argv[1:] if argv is None else argv, os.path.join(os.path.dirname(__file__), "grpo.yaml"))
    run = RLRun(cfg)                                   # config checks, data, run dir, trackers
    actor, ref, reward = build_workers(cfg, "actor", "ref", "reward")  # colocated: one process per rank
    run.attach(actor=actor, ref=ref, reward=reward)    # resume=auto restores weights, data order, step

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
            adv_metrics = compute_advantages(batch, cfg.algorithm, run.kl_ctrl)
        with run.stage("update_actor"):
            update = actor.update(batch)
        run.end_step(batch, adv_metrics, update)
    run.finish()
    return run


if __name__ == "__main__":
    main()
