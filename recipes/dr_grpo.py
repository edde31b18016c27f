"""Dr. GRPO — GRPO done right (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical
Perspective"): GRPO without its two biases.

    for each batch of prompts:
        responses ← actor.generate(prompts, n samples each)
        r_i       ← reward(prompt, response_i)                       # verifiable reward, no KL
        A_i       ← r_i − mean(r_group)                              # no ÷ std(r_group): no difficulty bias
        actor.update: Σ_t PPO-clip(ratio_t, A_i) / R, mean over responses   # no ÷ |response|: no length bias

No new estimator: ``grpo`` with ``algorithm.norm_adv_by_std=false`` and
``actor.loss_agg_mode=seq-mean-token-sum-norm`` (R = the number of response columns), and no KL
term, so no reference model (recipes/dr_grpo.yaml).

Run: ``python recipes/dr_grpo.py [--config FILE] key=value ...`` (defaults: recipes/dr_grpo.yaml).
"""
import os
import sys

from hybridflow.config import ConfigError, parse_cli
from hybridflow.trainer.build import build_workers
from hybridflow.trainer.rl import compute_advantages
from hybridflow.trainer.run import RLRun


def main(argv=None):
    cfg = parse_cli(sys.argv[1:] if argv is None else argv, os.path.join(os.path.dirname(__file__), "dr_grpo.yaml"))
    if cfg.actor.use_kl_loss or cfg.algorithm.use_kl_in_reward:
        raise ConfigError("recipes/dr_grpo.py has no reference model (Dr. GRPO drops the KL term); "
                          "for a KL, run recipes/grpo.py with the same overrides")
    run = RLRun(cfg)
    actor, reward = build_workers(cfg, "actor", "reward")
    run.attach(actor=actor, reward=reward)

    for batch in run.batches():
        with run.stage("gen"):
            batch = actor.generate(batch)
        with run.stage("reward"):
            batch.union(reward.compute_rewards(batch))
        with run.stage("old_log_prob"):
            batch.union(actor.compute_log_prob(batch))
        with run.stage("adv"):
            adv_metrics = compute_advantages(batch, cfg.algorithm)   # r − mean(r_group)
        with run.stage("update_actor"):
            update = actor.update(batch)                            # seq-mean-token-sum-norm
        run.end_step(batch, adv_metrics, update)
    run.finish()
    return run


if __name__ == "__main__":
    main()
