"""PPO for LLMs (Ouyang et al. 2022; Schulman et al. 2017) with a learned critic and GAE.

    for each batch of prompts:
        responses ← actor.generate(prompts)
        r         ← reward(prompt, response);  r_t ← r·[t = last] − β·KL(actor ‖ ref)_t
        V_t       ← critic.values(responses);  logp_old, logp_ref ← actor / ref log-probs
        A_t       ← GAE(r, V; γ, λ);  returns ← A + V
        critic.update: clipped value loss;  actor.update: PPO-clip(ratio, A)

Run: ``python recipes/ppo.py [--config FILE] key=value ...`` (defaults: recipes/ppo.yaml).
"""
import os
import sys

from hybridflow.config import parse_cli
from hybridflow.trainer.build import build_workers
from hybridflow.trainer.rl import compute_advantages
from hybridflow.trainer.run import RLRun


def main(argv=None):
    cfg = parse_cli(sys.argv[1:] if argv is None else argv, os.path.join(os.path.dirname(__file__), "ppo.yaml"))
    run = RLRun(cfg)
    actor, ref, critic, reward = build_workers(cfg, "actor", "ref", "critic", "reward")
    run.attach(actor=actor, ref=ref, critic=critic, reward=reward)

    for batch in run.batches():
        with run.stage("gen"):
            batch = actor.generate(batch)
        with run.stage("reward"):
            batch.union(reward.compute_rewards(batch))
        with run.stage("old_log_prob"):
            batch.union(actor.compute_log_prob(batch))
        with run.stage("ref"):
            batch.union(ref.compute_ref_log_prob(batch))
        with run.stage("values"):
            batch.union(critic.compute_values(batch))
        with run.stage("adv"):
            adv_metrics = compute_advantages(batch, cfg.algorithm, run.kl_ctrl)  # KL-penalised reward, GAE
        with run.stage("update_critic"):
            critic_update = critic.update(batch)
        with run.stage("update_actor"):
            actor_update = actor.update(batch)
        run.end_step(batch, adv_metrics, critic_update, actor_update)
    run.finish()
    return run


if __name__ == "__main__":
    main()
