"""ResourcePool, Role and WorkerGroup: the controller's handle on a set of ranks.

    pool = ResourcePool(world_size=2, executor="ray")      # or executor="inprocess" (1 rank)
    wg = WorkerGroup(pool, MyWorker, *init_args)          # one role
    groups = WorkerGroup.colocate(pool, actor=Role(Actor, cfg), ref=Role(Ref, cfg))  # one process per rank

Every ``@register``-ed method of the worker class becomes a method of the group; calling it
dispatches the arguments, runs the method on the ranks and collects the result (see
``hybridflow.decorator``). ``blocking=False`` methods return a :class:`~hybridflow.futures.Future`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from hybridflow.decorator import DISPATCH_MODES, EXECUTE_MODES, Dispatch, DispatchContext, MethodSpec, \
    registered_methods, strip_padding

EXECUTORS = ("inprocess", "ray")
DEFAULT_CALL_TIMEOUT_S = float(os.environ.get("HYBRIDFLOW_CALL_TIMEOUT_S", 3600))


class WorkerError(RuntimeError):
    """A worker could not run a call: it died, or did not answer in time."""


class WorkerTimeoutError(WorkerError, TimeoutError):
    """A call did not finish within the group's ``call_timeout_s``."""


class ResourcePool:
    """Ranks to place workers on.

    Args:
        world_size: number of ranks (processes). ``inprocess`` supports exactly 1.
        executor: ``"inprocess"`` (the controller's own process, no serialisation) or ``"ray"``.
        num_cpus_per_worker / num_gpus_per_worker: Ray resources of each rank's bundle
            (GPUs default to 1 when the Ray cluster has GPUs, else 0).
        call_timeout_s: a call that takes longer raises :class:`WorkerTimeoutError`.
        max_colocate: how many separate worker groups may share one bundle (each Ray actor
            takes ``1/max_colocate`` of the bundle's resources).
    """

    def __init__(self, world_size: int = 1, executor: str = "inprocess", *, num_cpus_per_worker: float = 1,
                 num_gpus_per_worker: float | None = None, call_timeout_s: float | None = None,
                 max_colocate: int = 4, name: str = "pool"):
        if executor not in EXECUTORS:
            raise ValueError(f"ResourcePool: unknown executor {executor!r}; choose one of {EXECUTORS}")
        if world_size < 1:
            raise ValueError(f"ResourcePool: world_size must be >= 1, got {world_size}")
        if executor == "inprocess" and world_size != 1:
            raise ValueError(f"ResourcePool: the inprocess executor runs exactly one rank (got world_size="
                             f"{world_size}); use executor='ray' for several ranks")
        self.world_size, self.executor, self.name = world_size, executor, name
        self.num_cpus_per_worker, self.num_gpus_per_worker = num_cpus_per_worker, num_gpus_per_worker
        self.call_timeout_s = call_timeout_s or DEFAULT_CALL_TIMEOUT_S
        self.max_colocate = max_colocate
        self.parent: ResourcePool | None = None
        self.offset = 0
        self._placement = None  # executor-owned state (Ray placement group)

    def split(self, *sizes: int) -> list["ResourcePool"]:
        """Disjoint sub-pools over consecutive ranks of this pool, e.g. ``pool.split(2, 2)``."""
        if sum(sizes) != self.world_size:
            raise ValueError(f"ResourcePool.split: sizes {sizes} do not add up to world_size {self.world_size}")
        pools, offset = [], 0
        for i, size in enumerate(sizes):
            sub = ResourcePool(size, "ray" if self.executor == "ray" else "inprocess",
                               num_cpus_per_worker=self.num_cpus_per_worker,
                               num_gpus_per_worker=self.num_gpus_per_worker, call_timeout_s=self.call_timeout_s,
                               max_colocate=self.max_colocate, name=f"{self.name}.{i}")
            sub.parent, sub.offset = self, offset
            pools.append(sub)
            offset += size
        return pools

    def root(self) -> tuple["ResourcePool", int]:
        """The pool that owns the resources and this pool's first bundle index in it."""
        pool, offset = self, 0
        while pool.parent is not None:
            offset += pool.offset
            pool = pool.parent
        return pool, offset

    def shutdown(self) -> None:
        """Release the pool's resources (kills the Ray workers placed on it)."""
        from hybridflow.executors import get_executor

        get_executor(self.executor).release(self.root()[0])


class Role:
    """A worker class with its constructor arguments: ``Role(ActorWorker, config)``."""

    def __init__(self, cls: type, *args: Any, **kwargs: Any):
        self.cls, self.args, self.kwargs = cls, args, kwargs

    def instantiate(self) -> Any:
        """The worker itself, in this process (what an executor does on each rank; for tests)."""
        return self.cls(*self.args, **self.kwargs)


@dataclass
class Collector:
    """Turns the per-rank outputs of one call into its result (picklable: Ray futures carry it)."""

    dispatch: str
    ctx: DispatchContext
    single: bool

    def __call__(self, outputs: list) -> Any:
        if self.single:
            return strip_padding(outputs[0])
        return DISPATCH_MODES[self.dispatch].collect_fn(self.ctx, outputs)


class WorkerGroup:
    """The controller-side handle of one role on a pool (see module docstring)."""

    def __init__(self, pool: ResourcePool, worker_cls: type | Role, *args: Any, **kwargs: Any):
        role = worker_cls if isinstance(worker_cls, Role) else Role(worker_cls, *args, **kwargs)
        handle = _spawn(pool, {"default": role})
        self._bind(pool, handle, "default", role.cls)

    @classmethod
    def colocate(cls, pool: ResourcePool, **roles: Role | type) -> dict[str, "WorkerGroup"]:
        """Several roles in the same process on every rank (one Ray actor per rank holds all of
        them), e.g. actor + rollout + reference for the hybrid engine. Returns ``{name: group}``."""
        if not roles:
            raise ValueError("WorkerGroup.colocate: give at least one role, e.g. actor=Role(ActorWorker)")
        roles = {name: r if isinstance(r, Role) else Role(r) for name, r in roles.items()}
        handle = _spawn(pool, roles)
        groups = {}
        for name, role in roles.items():
            group = cls.__new__(cls)
            group._bind(pool, handle, name, role.cls)
            groups[name] = group
        return groups

    def _bind(self, pool: ResourcePool, handle: Any, role: str, worker_cls: type) -> None:
        self.pool, self._handle, self._role, self.worker_cls = pool, handle, role, worker_cls
        self._mesh_cache: dict[str, list] = {}
        self._methods = registered_methods(worker_cls)
        for name, spec in self._methods.items():
            setattr(self, name, self._make_method(name, spec))

    @property
    def world_size(self) -> int:
        return self.pool.world_size

    def __repr__(self) -> str:
        return (f"WorkerGroup({self.worker_cls.__name__}, role={self._role!r}, world_size={self.world_size}, "
                f"executor={self.pool.executor!r})")

    def _make_method(self, name: str, spec: MethodSpec):
        def call(*args: Any, **kwargs: Any) -> Any:
            return self._call(name, spec, args, kwargs)

        call.__name__ = name
        call.__doc__ = getattr(self.worker_cls, name).__doc__
        return call

    def _call(self, name: str, spec: MethodSpec, args: tuple, kwargs: dict) -> Any:
        ranks = EXECUTE_MODES[spec.execute].ranks_fn(self.world_size)
        ctx = DispatchContext(ranks=ranks)
        if spec.dispatch == Dispatch.MESH_PROTO:
            ctx.mesh_info = [self.mesh_info(spec.mesh)[r] for r in ranks]
        calls = DISPATCH_MODES[spec.dispatch].dispatch_fn(ctx, args, kwargs)
        what = f"{self.worker_cls.__name__}.{name}"
        pending = self._handle.submit(self._role, name, ranks, calls, what)
        collect = Collector(spec.dispatch, ctx, EXECUTE_MODES[spec.execute].single)
        if spec.blocking:
            return collect(self._handle.wait(pending, self.pool.call_timeout_s, what))
        return self._handle.future(pending, collect, self.pool.call_timeout_s, what)

    def mesh_info(self, mesh: str) -> list[tuple[int, int, bool]]:
        """Each rank's declared ``(dp_rank, dp_size, collect)`` for ``mesh`` (asked once, then cached)."""
        if mesh not in self._mesh_cache:
            ranks = list(range(self.world_size))
            pending = self._handle.submit(self._role, "get_dispatch_info", ranks, [((mesh,), {})] * len(ranks),
                                          "get_dispatch_info")
            info = [tuple(i) for i in self._handle.wait(pending, self.pool.call_timeout_s, "get_dispatch_info")]
            sizes = {i[1] for i in info}
            if len(sizes) != 1:
                raise ValueError(f"mesh {mesh!r}: ranks declared different dp sizes {sorted(sizes)}")
            dp_size = sizes.pop()
            collecting = sorted(i[0] for i in info if i[2])
            if collecting != list(range(dp_size)):
                raise ValueError(f"mesh {mesh!r}: exactly one rank per dp rank must declare collect=True; "
                                 f"declared: {info}")
            self._mesh_cache[mesh] = info
        return self._mesh_cache[mesh]

    def shutdown(self) -> None:
        """Stop this group's processes (Ray) or drop its objects (inprocess)."""
        self._handle.shutdown()


def _spawn(pool: ResourcePool, roles: dict[str, Role]) -> Any:
    from hybridflow.executors import get_executor
    from hybridflow.worker import Worker

    for name, role in roles.items():
        if not (isinstance(role.cls, type) and issubclass(role.cls, Worker)):
            raise TypeError(f"role {name!r}: {role.cls!r} is not a hybridflow Worker subclass")
    return get_executor(pool.executor).spawn(pool, roles)
