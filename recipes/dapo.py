"""DAPO — Decoupled Clip and Dynamic sAmpling Policy Optimization (Yu et al. 2025).

    for each step:
        kept ← ∅
        while kept has < batch_size groups and rounds < max_gen_rounds:  # algorithm.dynamic_sampling
            prompts   ← next batch of prompts
            responses ← actor.generate(prompts, n samples each)
            acc       ← reward(prompt, response)
            r         ← acc + overlong_penalty(|response|)               # soft overlong punishment
            kept      ← kept ∪ {groups whose acc are not all equal}      # others have A = 0
        batch    ← the first batch_size groups of kept
        logp_old ← actor.log_prob(batch)
        A_i      ← (r_i − mean(r_group)) / std(r_group)
        actor.update: PPO-clip(ratio, A), ε_low 0.2 < ε_high 0.28            # clip-higher, token-mean, no KL

The extra prompts come from ``step.more_prompts()`` (the run's data order), so a resumed run sees
the same prompts as an uninterrupted one (the checkpoint stores the data position after the step's
last round).

Run: ``python recipes/dapo.py [--config FILE] key=value ...`` (defaults: recipes/dapo.yaml).
"""
import os
import sys

from hybridflow import DataProto
from hybridflow.config import ConfigError, parse_cli
from hybridflow.trainer.algos.shaping import add_overlong_penalty, groups_with_signal
from hybridflow.trainer.rl import add_old_log_probs, compute_advantages
from hybridflow.trainer.run import RLRun
from hybridflow.trainer.settings import DynamicSampling, OverlongBuffer
from hybridflow.workers import build_workers


def main(argv=None):
    cfg = parse_cli(sys.argv[1:] if argv is None else argv, os.path.join(os.path.dirname(__file__), "dapo.yaml"))
    run = RLRun(cfg)
    s = run.settings
    if s.needs_reference:
        raise ConfigError("actor.use_kl_loss / algorithm.use_kl_in_reward: DAPO has no KL term (no reference model)")
    rounds = s.algorithm.section("dynamic_sampling", DynamicSampling).max_gen_rounds
    overlong = s.algorithm.section("overlong_buffer", OverlongBuffer)
    groups_wanted, n = s.data.batch_size, s.rollout.n
    actor, reward = build_workers(s, "actor", "reward")
    run.attach(actor=actor, reward=reward)

    for step in run.steps():
        prompts, kept, stats = step.prompts, [], {"dapo/dropped_groups": 0, "dapo/gen_score/mean": []}
        for round_ in range(1, rounds + 1):
            if round_ > 1:
                prompts = step.more_prompts()          # the next prompts of the data order (own uids, seed)
            with step.stage("gen"):
                gen = actor.generate(prompts)
            with step.stage("reward"):
                gen.union(reward.compute_rewards(gen))
                acc = gen.batch["token_level_scores"].sum(-1)
                gen.batch["token_level_scores"], _ = add_overlong_penalty(
                    gen.batch["token_level_scores"], gen.batch["response_mask"], s.rollout.max_new_tokens,
                    overlong.len, overlong.penalty_factor)
            signal = groups_with_signal(acc, gen.non_tensor_batch["uid"])
            stats["dapo/dropped_groups"] += int((~signal).sum()) // n
            stats["dapo/gen_score/mean"].append(float(acc.mean()))
            kept.append(gen[signal])
            if sum(map(len, kept)) >= groups_wanted * n:
                break
        batch = DataProto.concat(kept)[:groups_wanted * n]  # groups are contiguous: whole groups only
        stats.update({"dapo/num_gen_rounds": round_, "dapo/kept_groups": len(batch) // n})
        if len(batch) == 0:                            # no group with signal in max_gen_rounds: no update
            step.log(gen, stats)
            continue
        add_old_log_probs(step, actor, batch)          # the old_log_prob stage, unless the update supplies π_old
        with step.stage("adv"):
            stats.update(compute_advantages(batch, s.algorithm))  # no KL in the reward: no metrics
        with step.stage("update_actor"):
            step.log(batch, stats, actor.update(batch))
    return run.finish()


if __name__ == "__main__":
    main()
