"""GRPO — Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath").

    for each batch of prompts:
        responses ← actor.generate(prompts, n samples each)              # rollout
        r         ← reward(prompt, response)                             # verifiable reward
        logp_old  ← actor.log_prob(responses)
        logp_ref  ← ref.log_prob(responses)            (only when a KL term reads it)
        A         ← estimator(r)        grpo: A_i = (r_i − mean(r_group)) / std(r_group), no critic
        actor.update: policy loss(ratio, A) + β·KL_k3(actor ‖ ref)       ppo: PPO-clip

The critic-free variants are configs of this dataflow (their YAML starts from grpo.yaml): rloo,
reinforce_pp, dr_grpo, gspo, ctpo. ``hybridflow gspo`` is ``python recipes/grpo.py --config
recipes/gspo.yaml``.

Run: ``python recipes/grpo.py [--config FILE] key=value ...`` (defaults: recipes/grpo.yaml).
"""
import os
import sys

from hybridflow.config import parse_cli
from hybridflow.trainer.rl import compute_advantages, sample_and_score
from hybridflow.trainer.run import RLRun
from hybridflow.workers import build_workers


def main(argv=None):
    cfg = parse_cli(sys.argv[1:] if argv is None else argv, os.path.join(os.path.dirname(__file__), "grpo.yaml"))
    run = RLRun(cfg)                                   # typed settings (checked), data, run dir, trackers
    actor, ref, reward = build_workers(run.settings, "actor", "ref", "reward")  # colocated; ref None without KL
    run.attach(actor=actor, ref=ref, reward=reward)    # resume=auto restores weights, data order, step

    for step in run.steps():                           # data.batch_size prompts each, uids shared per prompt
        batch = sample_and_score(step, actor, reward)  # stages gen, reward, old_log_prob
        if ref is not None:                            # a KL term (loss or reward) reads the reference
            with step.stage("ref"):
                batch.union(ref.compute_ref_log_prob(batch))
        with step.stage("adv"):
            adv_metrics = compute_advantages(batch, run.settings.algorithm, run.kl_ctrl)
        with step.stage("update_actor"):
            step.log(batch, adv_metrics, actor.update(batch))
    return run.finish()


if __name__ == "__main__":
    main()
