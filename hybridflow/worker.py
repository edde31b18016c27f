"""Worker: the base class of everything that runs on a rank.

A worker knows its place from the environment the executor set before constructing it
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), so the same worker
code runs under the in-process executor and under Ray. Subclasses mark controller-callable
methods with ``@register`` and, if they are model-parallel, declare their data-parallel position
with :meth:`Worker.set_dispatch_info` for ``Dispatch.MESH_PROTO``.
"""
from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from hybridflow.futures import resolve_arg
from hybridflow.protocol import PAD_KEY, DataProto

DEFAULT_COLLECTIVE_TIMEOUT_S = float(os.environ.get("HYBRIDFLOW_COLLECTIVE_TIMEOUT_S", 600))
# Set ("1") in the environment of a process that an executor started to host workers (a Ray rank),
# so controller code that such a process runs by accident (a user's script imported there) can refuse.
WORKER_PROCESS_ENV = "HYBRIDFLOW_WORKER_PROCESS"


class Worker:
    """Base class for workers. Attributes: ``rank``, ``world_size``, ``local_rank``, ``device``."""

    def __init__(self) -> None:
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self._dispatch_info: dict[str, tuple[int, int, bool]] = {}

    @property
    def device(self) -> torch.device:
        """``cuda:<local_rank>`` when a GPU is visible, else ``cpu``."""
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def init_distributed(self, backend: str | None = None, timeout_s: float | None = None) -> None:
        """Join the default process group (idempotent; colocated workers share it). See
        :func:`init_distributed`."""
        init_distributed(backend, timeout_s)

    # ------------------------------------------------------------------ dispatch info
    def set_dispatch_info(self, mesh: str, dp_rank: int, dp_size: int, collect: bool) -> None:
        """Declare this rank's data-parallel position for ``@register(dispatch=MESH_PROTO, mesh=mesh)``:
        ranks with the same ``dp_rank`` receive the same chunk; only ``collect=True`` ranks answer."""
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"set_dispatch_info({mesh!r}): dp_rank {dp_rank} not in [0, {dp_size})")
        self._dispatch_info[mesh] = (dp_rank, dp_size, collect)

    def get_dispatch_info(self, mesh: str) -> tuple[int, int, bool]:
        """Declared ``(dp_rank, dp_size, collect)``; by default every rank is its own dp rank."""
        return self._dispatch_info.get(mesh, (self.rank, self.world_size, True))

    # ------------------------------------------------------------------ executor entry point
    def _hybridflow_call(self, method: str, args: tuple, kwargs: dict) -> Any:
        """Run a registered method: resolve futures, hide runtime padding tags, tag the output."""
        args = tuple(resolve_arg(a) for a in args)
        kwargs = {k: resolve_arg(v) for k, v in kwargs.items()}
        pad, rows_in = 0, 0
        for value in list(args) + list(kwargs.values()):
            if isinstance(value, DataProto) and PAD_KEY in value.meta_info:
                pad, rows_in = value.meta_info.pop(PAD_KEY), len(value)
        output = getattr(self, method)(*args, **kwargs)
        if pad and isinstance(output, DataProto):
            if len(output) % rows_in:
                raise RuntimeError(f"{type(self).__name__}.{method}: got a padded chunk of {rows_in} rows and "
                                   f"returned {len(output)} rows; a DP method must return k rows per input row")
            output.meta_info[PAD_KEY] = pad * (len(output) // rows_in)
        return output


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> tuple[int, int]:
    """Initialise the default process group if needed; returns ``(rank, world_size)``.

    Rank and world size come from ``RANK``/``WORLD_SIZE``, the rendezvous from ``MASTER_ADDR``/
    ``MASTER_PORT`` (set by the executors, see :func:`rendezvous_server`); without them this is a
    world of one with a private store. Backend: nccl when a GPU is visible (and the current device
    is set to ``LOCAL_RANK``), else gloo. A collective that waits longer than ``timeout_s``
    (default ``HYBRIDFLOW_COLLECTIVE_TIMEOUT_S`` = 600 s) raises instead of hanging.
    """
    if not dist.is_initialized():
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        if "MASTER_PORT" in os.environ:
            addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
            rendezvous = {"init_method": f"tcp://{addr}:{os.environ['MASTER_PORT']}"}
        elif world == 1:  # a private store, not exported: child processes must not inherit it
            rendezvous = {"store": rendezvous_server()[0]}
        else:
            raise RuntimeError("init_distributed: MASTER_PORT is not set for a multi-rank group")
        dist.init_process_group(backend=backend or ("nccl" if torch.cuda.is_available() else "gloo"),
                                rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s or DEFAULT_COLLECTIVE_TIMEOUT_S),
                                **rendezvous)
    return dist.get_rank(), dist.get_world_size()


def rendezvous_server(addr: str = "127.0.0.1") -> tuple[dist.TCPStore, dict]:
    """The ranks' rendezvous store, served from this process on a port the kernel picks when it
    binds (port 0), so no other process can take the port between choosing and binding it.

    Returns ``(store, env)``: give ``env`` to every rank (``MASTER_ADDR``/``MASTER_PORT`` and
    ``TORCHELASTIC_USE_AGENT_STORE=True``, torch's switch that makes every rank, rank 0 included, a
    client of an outside store, as under torchrun) and keep ``store`` referenced while the group
    lives. ``addr`` is the address the ranks connect to (the server listens on every interface).
    """
    store = dist.TCPStore(addr, 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=DEFAULT_COLLECTIVE_TIMEOUT_S))
    return store, {"MASTER_ADDR": addr, "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True"}
