"""hybridflow runtime: the single-controller programming model (knows nothing of LLMs).

    from hybridflow import DataProto, Worker, register, Dispatch, Execute, ResourcePool, WorkerGroup
"""
from hybridflow.decorator import Dispatch, Execute, register, register_dispatch_mode, register_execute_mode
from hybridflow.futures import Future
from hybridflow.protocol import DataProto
from hybridflow.worker import Worker
from hybridflow.worker_group import ResourcePool, Role, WorkerError, WorkerGroup, WorkerTimeoutError

__all__ = ["DataProto", "Worker", "register", "Dispatch", "Execute", "ResourcePool", "WorkerGroup", "Role",
           "Future", "WorkerError", "WorkerTimeoutError", "register_dispatch_mode", "register_execute_mode"]
__version__ = "0.1.0"
