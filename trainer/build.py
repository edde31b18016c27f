"""Build the worker groups of a recipe from its config.

Every role runs colocated in one process per rank (the hybrid engine: the actor trains and
generates on the same module; reference, critic and reward share the process)."""
from __future__ import annotations

from hybridflow import ResourcePool, Role, WorkerGroup


def role_classes() -> dict:
    from hybridflow.workers.roles.actor import ActorWorker
    from hybridflow.workers.roles.critic import CostCriticWorker, CriticWorker
    from hybridflow.workers.roles.reference import ReferenceWorker
    from hybridflow.workers.roles.reward import CostWorker, RewardWorker
    from hybridflow.workers.roles.reward_model import RewardModelWorker

    return {"actor": ActorWorker, "ref": ReferenceWorker, "critic": CriticWorker, "reward": RewardWorker,
            "reward_model": RewardModelWorker, "cost": CostWorker, "cost_critic": CostCriticWorker}


def build_workers(cfg, *roles: str, classes: dict | None = None) -> tuple[WorkerGroup, ...]:
    """One WorkerGroup per role, all colocated on a pool of ``cfg.world_size`` ranks run by
    ``cfg.executor``. ``classes`` maps role names to Worker classes (default: the built-in roles;
    recipes may pass their own)."""
    known = {**role_classes(), **(classes or {})}
    unknown = [r for r in roles if r not in known]
    if unknown:
        raise ValueError(f"build_workers: unknown role(s) {unknown}; known: {sorted(known)}")
    pool = ResourcePool(world_size=int(cfg.world_size), executor=cfg.executor,
                        num_cpus_per_worker=float(cfg.get("num_cpus_per_worker", 1)))
    groups = WorkerGroup.colocate(pool, **{r: Role(known[r], cfg) for r in roles})
    return tuple(groups[r] for r in roles)
