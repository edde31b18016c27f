"""Generation backends behind one interface (:class:`~.base.Rollout`), chosen by ``rollout.backend``.

``build_rollout(backend, engine, rollout, seed)`` builds the backend for the actor's engine
(same process, same device). Each backend lives in its own module and is imported only when
chosen, so an optional dependency (vLLM) is needed only by the runs that use it.
"""
from __future__ import annotations

import importlib

__all__ = ["ROLLOUT_BACKENDS", "build_rollout"]

# name -> "module:factory"; a factory takes (engine, rollout: RolloutSettings, seed) and returns a Rollout.
# The names are those of the config contract (hybridflow.trainer.settings.ROLLOUT_BACKENDS).
ROLLOUT_BACKENDS = {
    "hf": "hybridflow.workers.rollout.hf:from_engine",
    "vllm": "hybridflow.workers.rollout.vllm:from_engine",
    "static": "hybridflow.workers.rollout.static:from_engine",  # static KV cache, CUDA-graph decode (static.py)
}


def build_rollout(backend: str, engine, rollout, seed: int = 0):
    """The rollout named ``backend`` (``rollout.backend``) on ``engine``'s module; ``rollout`` is
    the run's :class:`~hybridflow.trainer.settings.RolloutSettings`."""
    if backend not in ROLLOUT_BACKENDS:
        raise ValueError(f"unknown rollout backend {backend!r} (rollout.backend); "
                         f"available: {tuple(ROLLOUT_BACKENDS)}")
    module_name, factory = ROLLOUT_BACKENDS[backend].split(":")
    return getattr(importlib.import_module(module_name), factory)(engine, rollout, seed)
