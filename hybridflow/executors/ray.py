"""Ray executor: one Ray actor per rank, placed in the pool's placement group.

Each actor (a ``_Host``) sets the torch.distributed environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, and the address of the group's rendezvous store, which a small actor on rank 0's
node serves from a port the kernel picked, see ``rendezvous_server``) and then constructs every
colocated role's worker inside the same process. Calls are Ray actor tasks; results stay in Ray's
object store until the controller (or another group, via a future) asks for them.

Failures: a worker exception is re-raised in the controller as the original exception type with
the remote traceback in its message; a dead actor raises :class:`WorkerError` at once; a call
that does not finish within the pool's ``call_timeout_s`` raises :class:`WorkerTimeoutError`
naming the ranks still running.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from hybridflow.futures import Future
from hybridflow.worker import WORKER_PROCESS_ENV, rendezvous_server
from hybridflow.worker_group import WorkerError, WorkerTimeoutError

PLACEMENT_TIMEOUT_S = float(os.environ.get("HYBRIDFLOW_PLACEMENT_TIMEOUT_S", 120))
# Building the workers (imports, model loading) has its own limit, separate from call timeouts.
START_TIMEOUT_S = float(os.environ.get("HYBRIDFLOW_START_TIMEOUT_S", 1800))
FORWARDED_ENV = ("HYBRIDFLOW_", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


class _Host:
    """The process of one rank: holds the workers of every colocated role."""

    def __init__(self, env: dict, roles: dict):
        os.environ.update(env)
        os.environ[WORKER_PROCESS_ENV] = "1"
        self.workers = {name: cls(*args, **kwargs) for name, (cls, args, kwargs) in roles.items()}

    def call(self, role: str, method: str, args: tuple, kwargs: dict) -> Any:
        return self.workers[role]._hybridflow_call(method, args, kwargs)

    def pid(self) -> int:
        return os.getpid()


@ray.remote
class _Rendezvous:
    """Serves the group's rendezvous store on rank 0's node for as long as the group lives."""

    def start(self) -> dict:
        self.store, env = rendezvous_server(ray.util.get_node_ip_address())
        return env


def ensure_ray() -> None:
    """Start (or connect to, with ``RAY_ADDRESS``) Ray; workers see the controller's sys.path."""
    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
    env = {"TOKENIZERS_PARALLELISM": "false"}
    env.update({k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)})
    env["PYTHONPATH"] = pythonpath
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env={"env_vars": env})
    else:
        # Logical CPUs are not a limit on one machine: allow small multi-rank runs on 2 cores.
        ray.init(num_cpus=max(os.cpu_count() or 1, 8), include_dashboard=False,
                 runtime_env={"env_vars": env}, log_to_driver=True)


def _placement(pool) -> Any:
    root, _ = pool.root()
    if root._placement is None:
        ensure_ray()
        gpus = root.num_gpus_per_worker
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= root.world_size else 0
        bundle = {"CPU": root.num_cpus_per_worker, **({"GPU": gpus} if gpus else {})}
        pg = placement_group([dict(bundle) for _ in range(root.world_size)], strategy="PACK")
        try:
            ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except GetTimeoutError:
            remove_placement_group(pg)
            raise WorkerError(f"ResourcePool {root.name!r}: Ray could not reserve {root.world_size} bundles of "
                              f"{bundle} within {PLACEMENT_TIMEOUT_S:.0f}s; cluster has {ray.cluster_resources()}")
        root._placement = (pg, bundle)
    return root._placement


def spawn(pool, roles: dict) -> "RayHandle":
    pg, bundle = _placement(pool)
    root, offset = pool.root()
    share = {"num_cpus": bundle["CPU"] / root.max_colocate,
             "num_gpus": bundle.get("GPU", 0) / root.max_colocate}

    def strategy(rank: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=offset + rank)

    rendezvous = _Rendezvous.options(num_cpus=0, scheduling_strategy=strategy(0)).remote()
    try:
        store_env = ray.get(rendezvous.start.remote(), timeout=PLACEMENT_TIMEOUT_S)
    except BaseException:
        ray.kill(rendezvous)
        raise
    host_cls = ray.remote(_Host)
    specs = {name: (r.cls, r.args, r.kwargs) for name, r in roles.items()}
    actors = []
    for rank in range(pool.world_size):
        # Ray gives each actor its own CUDA_VISIBLE_DEVICES, so the visible device is index 0.
        env = {"RANK": str(rank), "WORLD_SIZE": str(pool.world_size), "LOCAL_RANK": "0", **store_env}
        actors.append(host_cls.options(scheduling_strategy=strategy(rank), **share).remote(env, specs))
    handle = RayHandle(actors, rendezvous)
    try:  # wait until every rank has built its workers, so call timeouts never include start-up
        wait_refs([a.pid.remote() for a in actors], list(range(len(actors))), START_TIMEOUT_S,
                  f"starting {'+'.join(f'{n}={r.cls.__name__}' for n, r in roles.items())}")
    except BaseException:
        handle.shutdown()
        raise
    return handle


def release(pool) -> None:
    if pool._placement is not None:
        remove_placement_group(pool._placement[0])
        pool._placement = None


class RayFuture(Future):
    """Object refs of one call's per-rank outputs plus how to collect them."""

    def __init__(self, refs: list, ranks: list[int], collect: Any, timeout: float, what: str):
        self.refs, self.ranks, self.collect, self.timeout, self.what = refs, ranks, collect, timeout, what

    def get(self, timeout: float | None = None) -> Any:
        return self.collect(wait_refs(self.refs, self.ranks, timeout or self.timeout, self.what))


class RayHandle:
    def __init__(self, actors: list, rendezvous: Any = None):
        self.actors, self.rendezvous = actors, rendezvous
        self.fetched = 0  # how many results the controller has materialised (for tests/benchmarks)

    def submit(self, role: str, method: str, ranks: list[int], calls: list, what: str) -> tuple[list, list]:
        refs = [self.actors[r].call.remote(role, method, args, kwargs) for r, (args, kwargs) in zip(ranks, calls)]
        return refs, ranks

    def wait(self, pending: tuple[list, list], timeout: float, what: str) -> list:
        refs, ranks = pending
        self.fetched += len(refs)
        return wait_refs(refs, ranks, timeout, what)

    def future(self, pending: tuple[list, list], collect: Any, timeout: float, what: str) -> RayFuture:
        refs, ranks = pending
        return RayFuture(refs, ranks, collect, timeout, what)

    def pids(self) -> list[int]:
        return ray.get([a.pid.remote() for a in self.actors])

    def shutdown(self) -> None:
        for actor in self.actors + ([self.rendezvous] if self.rendezvous is not None else []):
            ray.kill(actor)
        self.actors, self.rendezvous = [], None


def wait_refs(refs: list, ranks: list[int], timeout: float, what: str) -> list:
    """Results of all refs in order; the first failure is raised as soon as it happens."""
    deadline = time.monotonic() + timeout
    rank_of = {ref: rank for ref, rank in zip(refs, ranks)}
    remaining = list(refs)
    while remaining:
        left = deadline - time.monotonic()
        if left <= 0:
            pending = sorted(rank_of[r] for r in remaining)
            raise WorkerTimeoutError(f"{what}: ranks {pending} did not finish within {timeout:.0f}s "
                                     "(call_timeout_s of the ResourcePool; a worker may be stuck in a collective)")
        ready, remaining = ray.wait(remaining, num_returns=1, timeout=min(left, 5.0))
        for ref in ready:
            _get_one(ref, rank_of[ref], what)  # raises on failure
    return [_get_one(ref, rank_of[ref], what) for ref in refs]


def _get_one(ref: Any, rank: int, what: str) -> Any:
    try:
        return ray.get(ref)
    except RayTaskError as err:
        cause = err.as_instanceof_cause()
        cause.add_note(f"[hybridflow] raised by {what} on rank {rank} (ray executor); remote traceback above")
        raise cause from None
    except RayActorError as err:
        if getattr(err, "actor_init_failed", False):
            raise WorkerError(f"{what}: rank {rank} failed while constructing its worker:\n{err}") from None
        raise WorkerError(f"{what}: the worker process of rank {rank} died ({err})") from None
