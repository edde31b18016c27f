"""Build a run's worker groups: which role runs which worker class, with which settings, where.

    actor, ref, reward = build_workers(run.settings, "actor", "ref", "reward")

Every role runs colocated in one process per rank (the hybrid engine: the actor trains and
generates on the same module; reference, critic and reward share the process), on a pool of
``world_size`` ranks run by ``executor``. Each worker gets only its part of the settings, picked on
the controller by its class's ``role(settings)`` (e.g. :meth:`ActorWorker.role`); a worker class
without one gets the whole settings object.
"""
from __future__ import annotations

from hybridflow import ResourcePool, Role, WorkerGroup

__all__ = ["build_workers", "role_classes"]


def role_classes() -> dict:
    """The built-in roles by name (imported when a run builds them)."""
    from hybridflow.workers.roles.actor import ActorWorker
    from hybridflow.workers.roles.critic import CostCriticWorker, CriticWorker
    from hybridflow.workers.roles.reference import ReferenceWorker
    from hybridflow.workers.roles.reward import CostWorker, RewardWorker
    from hybridflow.workers.roles.reward_model import RewardModelWorker
    from hybridflow.workers.roles.sft import SFTWorker

    return {"actor": ActorWorker, "ref": ReferenceWorker, "critic": CriticWorker, "reward": RewardWorker,
            "reward_model": RewardModelWorker, "cost": CostWorker, "cost_critic": CostCriticWorker, "sft": SFTWorker}


def _check_engines(settings, roles) -> None:
    """Engine keys added with ``+`` (``+actor.forward_micro_batch_size=256``) exist for their backend."""
    from hybridflow.workers.roles.common import check_engine_options

    sections = {"actor": "actor", "critic": "critic", "cost_critic": "cost_critic", "reward": "reward", "cost": "cost",
                "sft": "optim", "reward_model": "optim"}
    for role in roles:
        section = sections.get(role)
        if role == "ref":
            check_engine_options(settings.reference_engine(), "ref")
        elif section and getattr(settings, section, None) is not None:
            check_engine_options(getattr(settings, section), section)


def build_workers(settings, *roles: str, classes: dict | None = None):
    """One WorkerGroup per role (None for a role the run does not need: ``ref`` when no KL term
    reads it; the actor's own group for ``ref`` when the actor's LoRA base is the reference,
    ``RLSettings.reference_from_actor``), all colocated on one pool. ``settings``: an :class:`~hybridflow.trainer.settings.RLSettings`
    (or SFT / reward-model settings); ``classes`` maps role names to Worker classes (default: the
    built-in roles; recipes may pass their own)."""
    known = {**role_classes(), **(classes or {})}
    unknown = [r for r in roles if r not in known]
    if unknown:
        raise ValueError(f"build_workers: unknown role(s) {unknown}; known: {sorted(known)}")
    skip_ref = not getattr(settings, "needs_reference", True) or (
        "actor" in roles and getattr(settings, "reference_from_actor", False))
    needed = [r for r in roles if not (r == "ref" and skip_ref)]
    _check_engines(settings, needed)
    pool = ResourcePool(world_size=settings.world_size, executor=settings.executor,
                        num_cpus_per_worker=settings.num_cpus_per_worker)
    specs = {r: known[r].role(settings) if hasattr(known[r], "role") else Role(known[r], settings) for r in needed}
    groups = WorkerGroup.colocate(pool, **specs)
    if "ref" in roles and getattr(settings, "needs_reference", True) and skip_ref:
        groups["ref"] = groups["actor"]  # LoRA: the actor with its adapters off is the reference
    return tuple(groups.get(r) for r in roles)
