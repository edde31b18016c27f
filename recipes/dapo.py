"""DAPO — Decoupled Clip and Dynamic sAmpling Policy Optimization (Yu et al. 2025).

    for each step:
        kept ← ∅
        while kept has < batch_size groups and rounds < max_gen_rounds:  # dynamic sampling
            prompts   ← next batch of prompts
            responses ← actor.generate(prompts, n samples each)
            acc       ← reward(prompt, response)
            r         ← acc + overlong_penalty(|response|)               # soft overlong punishment
            kept      ← kept ∪ {groups whose acc are not all equal}      # others have A = 0
        batch    ← the first batch_size groups of kept
        logp_old ← actor.log_prob(batch)
        A_i      ← (r_i − mean(r_group)) / std(r_group)
        actor.update: PPO-clip(ratio, A), ε_low 0.2 < ε_high 0.28            # clip-higher, token-mean, no KL

The extra prompts come from the run's loader, so a resumed run sees the same prompts as an
uninterrupted one (the checkpoint stores the loader position after the step's last round).

Run: ``python recipes/dapo.py [--config FILE] key=value ...`` (defaults: recipes/dapo.yaml).
"""
import os
import sys

from hybridflow import DataProto
from hybridflow.config import ConfigError, parse_cli
from hybridflow.trainer.algos.shaping import add_overlong_penalty, groups_with_signal
from hybridflow.trainer.build import build_workers
from hybridflow.trainer.rl import assign_uids, compute_advantages
from hybridflow.trainer.run import RLRun


def more_prompts(run, round_):
    """The loader's next batch for another round of the same step: its own uids and seed."""
    prompts = run.loader.next_batch()
    assign_uids(prompts, f"{run.step}.{round_}")
    prompts.meta_info.update(step=run.step, seed=int(run.cfg.seed) * 100003 + run.step + 1_000_003 * round_)
    return prompts


def main(argv=None):
    cfg = parse_cli(sys.argv[1:] if argv is None else argv, os.path.join(os.path.dirname(__file__), "dapo.yaml"))
    if cfg.actor.use_kl_loss:
        raise ConfigError("actor.use_kl_loss: DAPO has no KL term (this recipe builds no reference model)")
    algo, groups_wanted, n = cfg.algorithm, int(cfg.data.batch_size), int(cfg.rollout.n)
    run = RLRun(cfg)
    actor, reward = build_workers(cfg, "actor", "reward")
    run.attach(actor=actor, reward=reward)
    run.loader.total_steps = None                      # extra rounds also draw prompts: count updates instead
    batches = run.batches()

    for _ in range(run.step, int(cfg.trainer.steps)):
        prompts, kept, stats = next(batches), [], {"dapo/dropped_groups": 0, "dapo/gen_score/mean": []}
        for round_ in range(1, int(algo.max_gen_rounds) + 1):
            if round_ > 1:
                prompts = more_prompts(run, round_)
            with run.stage("gen"):
                gen = actor.generate(prompts)
            with run.stage("reward"):
                gen.union(reward.compute_rewards(gen))
                acc = gen.batch["token_level_scores"].sum(-1)
                gen.batch["token_level_scores"], _ = add_overlong_penalty(
                    gen.batch["token_level_scores"], gen.batch["response_mask"], int(cfg.rollout.max_new_tokens),
                    int(algo.overlong_buffer_len), float(algo.overlong_penalty_factor))
            signal = groups_with_signal(acc, gen.non_tensor_batch["uid"])
            stats["dapo/dropped_groups"] += int((~signal).sum()) // n
            stats["dapo/gen_score/mean"].append(float(acc.mean()))
            kept.append(gen[signal])
            if sum(map(len, kept)) >= groups_wanted * n:
                break
        batch = DataProto.concat(kept)[:groups_wanted * n]  # groups are contiguous: whole groups only
        stats.update({"dapo/num_gen_rounds": round_, "dapo/kept_groups": len(batch) // n})
        if len(batch) == 0:                            # no group with signal in max_gen_rounds: no update
            run.end_step(gen, stats)
            continue
        with run.stage("old_log_prob"):
            batch.union(actor.compute_log_prob(batch))
        with run.stage("adv"):
            adv_metrics = compute_advantages(batch, algo)
        with run.stage("update_actor"):
            update = actor.update(batch)
        run.end_step(batch, stats, adv_metrics, update)
    run.finish()
    return run


if __name__ == "__main__":
    main()
