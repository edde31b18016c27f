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
from hybridflow.trainer.rl import compute_advantages, sample_and_score
from hybridflow.trainer.run import RLRun
from hybridflow.workers import build_workers


def main(argv=None):
    cfg = parse_cli(sys.argv[1:] if argv is None else argv, os.path.join(os.path.dirname(__file__), "ppo.yaml"))
    run = RLRun(cfg)
    actor, ref, critic, reward = build_workers(run.settings, "actor", "ref", "critic", "reward")
    run.attach(actor=actor, ref=ref, critic=critic, reward=reward)

    for step in run.steps():
        batch = sample_and_score(step, actor, reward)   # stages gen, reward, old_log_prob
        with step.stage("ref"):
            batch.union(ref.compute_ref_log_prob(batch))
        with step.stage("values"):
            batch.union(critic.compute_values(batch))
        with step.stage("adv"):                         # the KL-penalised reward, then GAE
            adv_metrics = compute_advantages(batch, run.settings.algorithm, run.kl_ctrl)
        with step.stage("update_critic"):
            critic_update = critic.update(batch)
        with step.stage("update_actor"):
            actor_update = actor.update(batch)
        step.log(batch, adv_metrics, critic_update, actor_update)
    return run.finish()


if __name__ == "__main__":
    main()
