"""@register: how a Worker method is called from the controller.

``@register(dispatch=..., execute=..., blocking=...)`` marks a method of a Worker subclass. The
controller-side WorkerGroup then exposes it as ``group.method(...)``, which

1. **dispatches** the arguments into one ``(args, kwargs)`` per rank (``dispatch_fn``),
2. **executes** on the ranks chosen by the execute mode (all ranks, or rank 0 only),
3. **collects** the per-rank outputs into one result (``collect_fn``).

Dispatch and execute modes live in registries; ``register_dispatch_mode`` adds your own.

Built-in dispatch modes (``W`` = world size of the group):

- ``ONE_TO_ALL``: every rank gets the same arguments; result is the list of W outputs.
- ``ALL_TO_ALL``: every argument is a list of length W, rank r gets element r; result is a list.
- ``DP_COMPUTE_PROTO``: DataProto arguments are padded to a multiple of W, split into W equal
  chunks (rank r gets chunk r); outputs are concatenated in rank order and the padding removed.
- ``MESH_PROTO``: like DP_COMPUTE_PROTO, but each worker *declares* its data-parallel position
  with ``Worker.set_dispatch_info(mesh, dp_rank, dp_size, collect)``: the batch is split into
  ``dp_size`` chunks, every rank receives the chunk of its dp rank (so TP/PP ranks of one dp
  group get the same chunk), and only the ranks that declared ``collect=True`` answer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from hybridflow.futures import Future
from hybridflow.protocol import PAD_KEY, DataProto, pad_rows_in_chunks

METHOD_ATTR = "_hybridflow_register"


class Dispatch:
    """Names of the built-in dispatch modes (plain strings: user modes are strings too)."""

    ONE_TO_ALL = "one_to_all"
    ALL_TO_ALL = "all_to_all"
    DP_COMPUTE_PROTO = "dp_compute_proto"
    MESH_PROTO = "mesh_proto"


class Execute:
    """Names of the built-in execute modes."""

    ALL = "all"
    RANK_ZERO = "rank_zero"


@dataclass(frozen=True)
class DispatchMode:
    """``dispatch_fn(ctx, args, kwargs) -> list[(args, kwargs)]`` one per rank that runs, and
    ``collect_fn(ctx, outputs) -> result`` where outputs are those ranks' returns in rank order.
    ``ctx`` is a :class:`DispatchContext`."""

    dispatch_fn: Callable
    collect_fn: Callable


@dataclass
class DispatchContext:
    """What a dispatch mode may know about the call: the ranks that run it and, for mesh modes,
    each rank's declared ``(dp_rank, dp_size, collect)``."""

    ranks: list[int]
    mesh_info: list[tuple[int, int, bool]] | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    """What @register recorded on a method."""

    dispatch: str
    execute: str
    blocking: bool
    mesh: str


DISPATCH_MODES: dict[str, DispatchMode] = {}
EXECUTE_MODES: dict[str, "ExecuteMode"] = {}


@dataclass(frozen=True)
class ExecuteMode:
    """``ranks_fn(world_size) -> ranks that run the method``; ``single=True`` returns that one
    rank's (collected) output instead of a list."""

    ranks_fn: Callable[[int], list[int]]
    single: bool = False


def register_dispatch_mode(name: str, dispatch_fn: Callable, collect_fn: Callable) -> str:
    """Add a dispatch mode (see :class:`DispatchMode`); returns ``name`` for use in @register."""
    DISPATCH_MODES[name] = DispatchMode(dispatch_fn, collect_fn)
    return name


def register_execute_mode(name: str, ranks_fn: Callable[[int], list[int]], single: bool = False) -> str:
    """Add an execute mode (see :class:`ExecuteMode`); returns ``name`` for use in @register."""
    EXECUTE_MODES[name] = ExecuteMode(ranks_fn, single)
    return name


def register(dispatch: str = Dispatch.ONE_TO_ALL, execute: str = Execute.ALL, blocking: bool = True,
             mesh: str = "default") -> Callable:
    """Mark a Worker method as callable from the controller (see the module docstring)."""
    if dispatch not in DISPATCH_MODES:
        raise ValueError(f"@register: unknown dispatch mode {dispatch!r}; known: {sorted(DISPATCH_MODES)}")
    if execute not in EXECUTE_MODES:
        raise ValueError(f"@register: unknown execute mode {execute!r}; known: {sorted(EXECUTE_MODES)}")

    def decorate(method: Callable) -> Callable:
        setattr(method, METHOD_ATTR, MethodSpec(dispatch, execute, blocking, mesh))
        return method

    return decorate


def registered_methods(cls: type) -> dict[str, MethodSpec]:
    """All @register-ed methods of a Worker class (including inherited ones)."""
    found = {}
    for name in dir(cls):
        spec = getattr(getattr(cls, name, None), METHOD_ATTR, None)
        if isinstance(spec, MethodSpec):
            found[name] = spec
    return found


# ---------------------------------------------------------------------- built-in modes
def _one_to_all(ctx: DispatchContext, args: tuple, kwargs: dict) -> list:
    return [(args, kwargs) for _ in ctx.ranks]


def _as_list(ctx: DispatchContext, outputs: list) -> list:
    return list(outputs)


def _all_to_all(ctx: DispatchContext, args: tuple, kwargs: dict) -> list:
    n = len(ctx.ranks)
    for value in list(args) + list(kwargs.values()):
        if not isinstance(value, (list, tuple)) or len(value) != n:
            raise ValueError(f"ALL_TO_ALL: every argument must be a list with one entry per rank ({n}); "
                             f"got {type(value).__name__} of length {len(value) if hasattr(value, '__len__') else '?'}")
    return [(tuple(a[i] for a in args), {k: v[i] for k, v in kwargs.items()}) for i in range(n)]


def split_for_dp(value: Any, dp_size: int) -> list:
    """Split one argument into dp_size pieces: DataProto (padded, each chunk tagged with its
    number of padding rows) and futures are split; anything else is passed to every rank."""
    if isinstance(value, DataProto):
        padded, pad = value.pad_to_divisor(dp_size)
        chunks = padded.chunk(dp_size)
        for chunk, rows in zip(chunks, pad_rows_in_chunks(len(padded), dp_size, pad)):
            chunk.meta_info[PAD_KEY] = rows
        return chunks
    if isinstance(value, Future):  # from a non-blocking call: split lazily on the receiving workers
        return value.dp_chunks(dp_size)
    return [value] * dp_size


def _dp_split(args: tuple, kwargs: dict, dp_size: int) -> list[tuple[tuple, dict]]:
    split_args = [split_for_dp(a, dp_size) for a in args]
    split_kwargs = {k: split_for_dp(v, dp_size) for k, v in kwargs.items()}
    return [(tuple(a[i] for a in split_args), {k: v[i] for k, v in split_kwargs.items()})
            for i in range(dp_size)]


def strip_padding(output: Any) -> Any:
    """Drop the rows that the runtime padded (the worker side tagged how many)."""
    if isinstance(output, DataProto) and PAD_KEY in output.meta_info:
        return output.unpad(output.meta_info.pop(PAD_KEY))
    return output


def concat_outputs(outputs: list) -> Any:
    outputs = [strip_padding(o) for o in outputs]
    if all(isinstance(o, DataProto) for o in outputs):
        return DataProto.concat(outputs)
    if all(o is None for o in outputs):
        return None
    return outputs


def _dp_compute_proto(ctx: DispatchContext, args: tuple, kwargs: dict) -> list:
    return _dp_split(args, kwargs, len(ctx.ranks))


def _dp_collect(ctx: DispatchContext, outputs: list) -> Any:
    return concat_outputs(outputs)


def _mesh_dispatch(ctx: DispatchContext, args: tuple, kwargs: dict) -> list:
    dp_size = ctx.mesh_info[0][1]
    per_dp = _dp_split(args, kwargs, dp_size)
    return [per_dp[dp_rank] for dp_rank, _, _ in ctx.mesh_info]


def _mesh_collect(ctx: DispatchContext, outputs: list) -> Any:
    answering = sorted((info[0], out) for info, out in zip(ctx.mesh_info, outputs) if info[2])
    return concat_outputs([out for _, out in answering])


register_dispatch_mode(Dispatch.ONE_TO_ALL, _one_to_all, _as_list)
register_dispatch_mode(Dispatch.ALL_TO_ALL, _all_to_all, _as_list)
register_dispatch_mode(Dispatch.DP_COMPUTE_PROTO, _dp_compute_proto, _dp_collect)
register_dispatch_mode(Dispatch.MESH_PROTO, _mesh_dispatch, _mesh_collect)
register_execute_mode(Execute.ALL, lambda world_size: list(range(world_size)))
register_execute_mode(Execute.RANK_ZERO, lambda world_size: [0], single=True)
