"""Executors place workers on ranks and carry calls to them.

An executor module provides ``spawn(pool, roles) -> handle`` and ``release(pool)``; the handle
has ``submit(role, method, ranks, calls, what) -> pending``, ``wait(pending, timeout, what)``,
``future(pending, collect, timeout, what)`` and ``shutdown()``.
"""
import importlib


def get_executor(name: str):
    """The executor module for ``name`` ("inprocess" or "ray"); Ray is imported only when used."""
    if name == "ray":
        try:
            return importlib.import_module("hybridflow.executors.ray")
        except ImportError as err:
            if "ray" in str(err):
                raise ImportError("executor='ray' needs Ray: pip install 'hybridflow[ray]'") from err
            raise
    return importlib.import_module(f"hybridflow.executors.{name}")
