"""REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language
Models"): REINFORCE with PPO's tricks and no critic.

    for each batch of prompts:
        responses ← actor.generate(prompts)                        # n = 1 is enough: no group needed
        r_t       ← reward(prompt, response)·[t = last] − β·KL_t(actor ‖ ref)      # token rewards
        G_t       ← Σ_{k ≥ t} γ^{k−t} r_k                                           # return to go
        A_t       ← (G_t − mean(G)) / std(G)       over every response token of the batch
        actor.update: PPO-clip(ratio, A)                                            # no KL loss

With ``algorithm.adv_estimator=reinforce_plus_plus_baseline`` the outcome reward minus its
prompt's group mean is whitened instead (needs ``rollout.n`` ≥ 2).

Run: ``python recipes/reinforce_pp.py [--config FILE] key=value ...`` (defaults: recipes/reinforce_pp.yaml).
"""
import os
import sys

from hybridflow.config import parse_cli
from hybridflow.trainer.build import build_workers
from hybridflow.trainer.rl import compute_advantages
from hybridflow.trainer.run import RLRun


def main(argv=None):
    cfg = parse_cli(sys.argv[1:] if argv is None else argv,
                    os.path.join(os.path.dirname(__file__), "reinforce_pp.yaml"))
    run = RLRun(cfg)
    actor, ref, reward = build_workers(cfg, "actor", "ref", "reward")
    run.attach(actor=actor, ref=ref, reward=reward)

    for batch in run.batches():
        with run.stage("gen"):
            batch = actor.generate(batch)
        with run.stage("reward"):
            batch.union(reward.compute_rewards(batch))
        with run.stage("old_log_prob"):
            batch.union(actor.compute_log_prob(batch))
        with run.stage("ref"):
            batch.union(ref.compute_ref_log_prob(batch))
        with run.stage("adv"):
            adv_metrics = compute_advantages(batch, cfg.algorithm, run.kl_ctrl)  # r − β·KL, returns, whitening
        with run.stage("update_actor"):
            update = actor.update(batch)
        run.end_step(batch, adv_metrics, update)
    run.finish()
    return run


if __name__ == "__main__":
    main()
