"""Futures returned by ``blocking=False`` calls.

A future can be passed straight into another group's call. The controller then sends the
*future* (not the data) to the target ranks, and each rank materialises what it needs there:
the whole value (``ONE_TO_ALL``) or its data-parallel chunk (``DP_COMPUTE_PROTO``/``MESH_PROTO``).
With Ray the data moves worker → object store → worker and never through the controller.
"""
from __future__ import annotations

from typing import Any


class Future:
    """Base class. ``get()`` materialises on the controller; ``resolve()`` is what a worker calls
    when the future arrives as an argument; ``dp_chunks(n)`` splits it lazily for DP dispatch."""

    def get(self, timeout: float | None = None) -> Any:
        raise NotImplementedError

    def resolve(self) -> Any:
        return self.get()

    def dp_chunks(self, dp_size: int) -> list["FutureChunk"]:
        return [FutureChunk(self, i, dp_size) for i in range(dp_size)]


class ValueFuture(Future):
    """A future whose value already exists (the in-process executor runs calls eagerly)."""

    def __init__(self, value: Any):
        self.value = value

    def get(self, timeout: float | None = None) -> Any:
        return self.value


class FutureChunk:
    """Chunk ``index`` of ``dp_size`` of a future's value, split on the worker that receives it."""

    def __init__(self, future: Future, index: int, dp_size: int):
        self.future, self.index, self.dp_size = future, index, dp_size

    def resolve(self) -> Any:
        from hybridflow.decorator import split_for_dp

        return split_for_dp(self.future.resolve(), self.dp_size)[self.index]


def resolve_arg(value: Any) -> Any:
    """Materialise a future or future chunk received as an argument; other values pass through."""
    return value.resolve() if isinstance(value, (Future, FutureChunk)) else value
