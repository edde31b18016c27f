"""Worker classes used by the runtime tests (importable by Ray worker processes)."""
import os
import time

import torch
import torch.distributed as dist

from hybridflow import DataProto, Dispatch, Execute, Worker, register


class Echo(Worker):
    def __init__(self, scale: int = 1):
        super().__init__()
        self.scale = scale
        self.last_seen = None

    @register(dispatch=Dispatch.ONE_TO_ALL)
    def info(self):
        return {"rank": self.rank, "world_size": self.world_size, "pid": os.getpid()}

    @register(dispatch=Dispatch.ALL_TO_ALL)
    def take(self, x, y=0):
        return x * 10 + y + self.rank

    @register(dispatch=Dispatch.DP_COMPUTE_PROTO)
    def scale_rows(self, data: DataProto) -> DataProto:
        self.last_seen = data.batch["x"].tolist()
        return DataProto.from_dict({"x": data.batch["x"] * self.scale, "rank": torch.full((len(data),), self.rank)},
                                   {"uid": data.non_tensor_batch["uid"]})

    @register(dispatch=Dispatch.DP_COMPUTE_PROTO, blocking=False)
    def scale_rows_async(self, data: DataProto) -> DataProto:
        return self.scale_rows(data)

    @register(dispatch=Dispatch.DP_COMPUTE_PROTO)
    def sample(self, data: DataProto, n: int) -> DataProto:
        """Returns n rows per input row (like generation with n samples)."""
        return data.repeat(n)

    @register(dispatch=Dispatch.ONE_TO_ALL)
    def seen(self):
        return self.last_seen

    @register(dispatch=Dispatch.ONE_TO_ALL, execute=Execute.RANK_ZERO)
    def only_rank_zero(self):
        return self.rank

    @register(dispatch=Dispatch.ONE_TO_ALL)
    def total(self, data: DataProto):
        return int(data.batch["x"].sum())

    @register(dispatch=Dispatch.ONE_TO_ALL)
    def fail_on(self, rank: int):
        if self.rank == rank:
            raise ValueError(f"bad input on rank {self.rank}: row 3 has no prompt")
        return "ok"

    @register(dispatch=Dispatch.ONE_TO_ALL)
    def die_on(self, rank: int):
        if self.rank == rank:
            os._exit(3)
        time.sleep(0.5)
        return "alive"

    @register(dispatch=Dispatch.ONE_TO_ALL)
    def sleep(self, seconds: float):
        time.sleep(seconds)
        return seconds

    @register(dispatch=Dispatch.ONE_TO_ALL)
    def allreduce_unless(self, skip_rank: int, timeout_s: float):
        self.init_distributed(timeout_s=timeout_s)
        value = torch.tensor([float(self.rank + 1)])
        if self.rank != skip_rank:
            dist.all_reduce(value)
        return value.item()


class MeshEcho(Worker):
    """Declares a (dp, tp) layout: tp peers share a dp rank; the last tp rank answers."""

    def __init__(self, tp: int):
        super().__init__()
        self.set_dispatch_info("train", dp_rank=self.rank // tp, dp_size=self.world_size // tp,
                               collect=self.rank % tp == tp - 1)
        self.last_seen = None

    @register(dispatch=Dispatch.MESH_PROTO, mesh="train")
    def compute(self, data: DataProto) -> DataProto:
        self.last_seen = data.batch["x"].tolist()
        return DataProto.from_dict({"x": data.batch["x"] + 100, "rank": torch.full((len(data),), self.rank)})

    @register(dispatch=Dispatch.ONE_TO_ALL)
    def seen(self):
        return self.last_seen


class Regressor(Worker):
    """Data-parallel SGD on a linear model: gradients averaged over ranks with all_reduce."""

    def __init__(self, dim: int, lr: float):
        super().__init__()
        self.init_distributed()
        torch.manual_seed(0)
        self.w = torch.randn(dim, requires_grad=True)
        self.lr = lr

    @register(dispatch=Dispatch.DP_COMPUTE_PROTO)
    def step(self, data: DataProto) -> DataProto:
        x, y = data.batch["x"], data.batch["y"]
        pred = x @ self.w
        loss = ((pred - y) ** 2).mean()
        loss.backward()
        grad = self.w.grad.detach().clone()
        if self.world_size > 1:
            dist.all_reduce(grad)
            grad /= self.world_size
        with torch.no_grad():
            self.w -= self.lr * grad
        self.w.grad = None
        return DataProto.from_dict({"pred": pred.detach()}, meta_info={"metrics": {"loss": loss.item()}})

    @register(dispatch=Dispatch.ONE_TO_ALL, execute=Execute.RANK_ZERO)
    def weights(self):
        return self.w.detach().clone()
