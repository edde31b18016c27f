"""Safe RLHF — PPO-Lagrangian with a reward and a cost (Dai et al. 2024, "Safe RLHF: Safe
Reinforcement Learning from Human Feedback").

    maximise_θ J_r(θ)  subject to  J_c(θ) ≤ d                        # d: algorithm.lagrange.threshold
    for each batch of prompts:
        responses ← actor.generate(prompts)
        r, c      ← reward(prompt, response), cost(prompt, response)     # functions and/or models
        logp_old, logp_ref ← actor / ref log-probs;  r_t ← r·[t = last] − β·KL(actor ‖ ref)_t
        V_r, V_c  ← critic.values, cost_critic.values
        λ         ← max(0, λ + lr_λ·(mean(c) − d))                       # dual step on the multiplier
        A_r, A_c  ← GAE(r, V_r), GAE(c, V_c);  returns ← A + V each
        A         ← (A_r − λ·A_c) / (1 + λ)                               # advantage of r − λ·c, rescaled
        critic / cost_critic.update: clipped value losses;  actor.update: PPO-clip(ratio, A)

λ is saved in every checkpoint and restored on resume (``run.attach(controllers=...)``).
Run: ``python recipes/safe_rlhf.py [--config FILE] key=value ...`` (defaults: recipes/safe_rlhf.yaml).
"""
import os
import sys

from hybridflow.config import parse_cli
from hybridflow.trainer.algos import get_advantage, lagrangian_advantage, make_lagrange
from hybridflow.trainer.rl import compute_advantages, sample_and_score
from hybridflow.trainer.run import RLRun
from hybridflow.workers import build_workers


def cost_advantages(batch, algo):
    """A_c with the reward's estimator on the cost (no KL term); sets ``cost_returns`` for the cost critic."""
    adv, batch.batch["cost_returns"] = get_advantage(algo.adv_estimator)(
        batch.batch["token_level_costs"], batch.batch["response_mask"], index=batch.non_tensor_batch["uid"],
        values=batch.batch["cost_values"], gamma=algo.gamma, lam=algo.lam)
    return adv


def main(argv=None):
    cfg = parse_cli(sys.argv[1:] if argv is None else argv, os.path.join(os.path.dirname(__file__), "safe_rlhf.yaml"))
    run = RLRun(cfg)
    algo = run.settings.algorithm
    lagrange = make_lagrange(algo.section("lagrange"))     # λ ≥ 0 and its dual step
    actor, ref, critic, cost_critic, reward, cost = build_workers(
        run.settings, "actor", "ref", "critic", "cost_critic", "reward", "cost")
    run.attach(actor=actor, ref=ref, critic=critic, cost_critic=cost_critic, reward=reward, cost=cost,
               controllers={"lagrange": lagrange})

    for step in run.steps():
        batch = sample_and_score(step, actor, reward)       # stages gen, reward (r), old_log_prob
        with step.stage("reward"):                          # c (its metrics go to step.log)
            costs = cost.compute_rewards(batch)
            batch.batch["token_level_costs"] = costs.batch["token_level_costs"]
        with step.stage("ref"):
            batch.union(ref.compute_ref_log_prob(batch))
        with step.stage("values"):
            batch.union(critic.compute_values(batch))       # values
            batch.union(cost_critic.compute_values(batch))  # cost_values
        with step.stage("adv"):
            episode_cost = batch.batch["token_level_costs"].sum(-1)
            lagrange_metrics = lagrange.update(episode_cost.mean())
            adv_metrics = compute_advantages(batch, algo, run.kl_ctrl)  # A_r: KL-penalised reward, GAE
            cost_adv = cost_advantages(batch, algo)                     # A_c, cost_returns: GAE
            batch.batch["advantages"] = lagrangian_advantage(batch.batch["advantages"], cost_adv, lagrange.value,
                                                             batch.batch["response_mask"])
        with step.stage("update_critic"):
            critic_update, cost_critic_update = critic.update(batch), cost_critic.update(batch)
        with step.stage("update_actor"):
            actor_update = actor.update(batch)
        safety = {"cost/mean": float(episode_cost.mean()), **lagrange_metrics}
        step.log(batch, costs, safety, adv_metrics, critic_update, cost_critic_update, actor_update)
    return run.finish()


if __name__ == "__main__":
    main()
