"""The same controller script gives identical results on the inprocess and the ray executor."""
import pytest
import torch

from hybridflow import DataProto, ResourcePool, WorkerGroup

from .workers import Regressor


def controller(executor: str, world_size: int) -> tuple[torch.Tensor, list[float]]:
    """A tiny data-parallel regression: the kind of loop a recipe is."""
    pool = ResourcePool(world_size=world_size, executor=executor, num_cpus_per_worker=0.5)
    group = WorkerGroup(pool, Regressor, dim=3, lr=0.1)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=gen)
    y = x @ torch.tensor([1.0, -2.0, 0.5])
    preds = []
    for _ in range(5):
        out = group.step(DataProto.from_dict({"x": x, "y": y}))
        preds.append(out.batch["pred"].sum().item())
    weights = group.weights()
    group.shutdown()
    pool.shutdown()
    return weights, preds


def test_inprocess_and_ray_agree(ray_cluster):
    w_local, p_local = controller("inprocess", 1)
    w_ray1, p_ray1 = controller("ray", 1)
    w_ray2, p_ray2 = controller("ray", 2)  # data-parallel: equal shards, averaged gradients
    assert torch.equal(w_local, w_ray1) and p_local == p_ray1
    assert torch.allclose(w_local, w_ray2, atol=1e-6)
    assert p_local == pytest.approx(p_ray2, abs=1e-5)
