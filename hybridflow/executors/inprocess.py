"""In-process executor: one rank, the workers live in the controller's process.

Calls are direct method calls (no serialisation); a worker exception propagates unchanged with
a note naming the call. This is how CPU and single-GPU runs work, Ray or not installed.
"""
from __future__ import annotations

import os
from typing import Any

from hybridflow.futures import ValueFuture


class InProcessHandle:
    def __init__(self, workers: dict):
        self.workers = workers

    def submit(self, role: str, method: str, ranks: list[int], calls: list, what: str) -> list:
        (args, kwargs), = calls
        try:
            return [self.workers[role]._hybridflow_call(method, args, kwargs)]
        except Exception as err:
            err.add_note(f"[hybridflow] raised by {what} on rank 0 (inprocess executor)")
            raise

    def wait(self, pending: list, timeout: float, what: str) -> list:
        return pending

    def future(self, pending: list, collect: Any, timeout: float, what: str) -> ValueFuture:
        return ValueFuture(collect(pending))

    def shutdown(self) -> None:
        self.workers.clear()


def spawn(pool, roles: dict) -> InProcessHandle:
    """Construct each role's worker here, as rank 0 of a world of 1."""
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})  # init_distributed: a private store
    return InProcessHandle({name: role.cls(*role.args, **role.kwargs) for name, role in roles.items()})


def release(pool) -> None:
    """Nothing to release: the workers are ordinary objects."""
