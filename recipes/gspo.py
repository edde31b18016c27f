"""GSPO — Group Sequence Policy Optimization (Zheng et al. 2025).

    for each batch of prompts:
        responses   ← actor.generate(prompts, n samples each)            # rollout
        r           ← reward(prompt, response)                           # verifiable reward
        logp_old    ← actor.log_prob(responses)
        A_i         ← (r_i − mean(r_group)) / std(r_group)               # group baseline, no critic
        s_i         ← exp(mean_t(logp − logp_old))                       # one length-normalised ratio
        actor.update: −mean_i min(s_i·A_i, clip(s_i, 1−ε_low, 1+ε_high)·A_i)   # clipped per sequence, no KL

The loss is the registry entry ``gspo`` (trainer/algos/sequence_losses.py), in the paper's
GSPO-token form (same value and gradient). There is no KL term, so no reference model.

Run: ``python recipes/gspo.py [--config FILE] key=value ...`` (defaults: recipes/gspo.yaml).
"""
import os
import sys

from hybridflow.config import ConfigError, parse_cli
from hybridflow.trainer.build import build_workers
from hybridflow.trainer.rl import compute_advantages
from hybridflow.trainer.run import RLRun


def main(argv=None):
    cfg = parse_cli(sys.argv[1:] if argv is None else argv, os.path.join(os.path.dirname(__file__), "gspo.yaml"))
    if cfg.actor.use_kl_loss:
        raise ConfigError("actor.use_kl_loss: GSPO has no KL term (this recipe builds no reference model)")
    run = RLRun(cfg)                                   # config checks, data, run dir, trackers
    actor, reward = build_workers(cfg, "actor", "reward")
    run.attach(actor=actor, reward=reward)             # resume=auto restores weights, data order, step

    for batch in run.batches():
        with run.stage("gen"):
            batch = actor.generate(batch)              # n samples per prompt, uids shared per prompt
        with run.stage("reward"):
            batch.union(reward.compute_rewards(batch))
        with run.stage("old_log_prob"):
            batch.union(actor.compute_log_prob(batch))
        with run.stage("adv"):
            adv_metrics = compute_advantages(batch, cfg.algorithm)
        with run.stage("update_actor"):
            update = actor.update(batch)               # policy_loss: gspo
        run.end_step(batch, adv_metrics, update)
    run.finish()
    return run


if __name__ == "__main__":
    main()
