"""Every dispatch/execute mode on both executors, futures, colocation, pool splitting."""
import pytest
import torch

from hybridflow import DataProto, ResourcePool, Role, WorkerGroup

from .workers import Echo, MeshEcho

EXECUTORS = [("inprocess", 1), ("ray", 2)]


def batch(n):
    return DataProto.from_dict({"x": torch.arange(n)}, {"uid": [f"u{i}" for i in range(n)]})


@pytest.fixture(scope="module", params=EXECUTORS, ids=[e for e, _ in EXECUTORS])
def echo(request):
    executor, world = request.param
    if executor == "ray":
        request.getfixturevalue("ray_cluster")
    pool = ResourcePool(world_size=world, executor=executor)
    group = WorkerGroup(pool, Echo, scale=3)
    yield group
    group.shutdown()
    pool.shutdown()


def test_one_to_all_reaches_every_rank(echo):
    infos = echo.info()
    assert [i["rank"] for i in infos] == list(range(echo.world_size))
    assert all(i["world_size"] == echo.world_size for i in infos)


def test_all_to_all_gives_each_rank_its_element(echo):
    w = echo.world_size
    assert echo.take(list(range(w)), y=[5] * w) == [r * 10 + 5 + r for r in range(w)]
    with pytest.raises(ValueError, match="one entry per rank"):
        echo.take([1] * (w + 1))


@pytest.mark.parametrize("n", [4, 5, 1])
def test_dp_compute_proto_splits_pads_and_gathers_in_order(echo, n):
    out = echo.scale_rows(batch(n))
    assert out.batch["x"].tolist() == [3 * i for i in range(n)]
    assert list(out.non_tensor_batch["uid"]) == [f"u{i}" for i in range(n)]
    w = echo.world_size
    per_rank = -(-n // w)  # padded to a multiple of the world size, then split evenly
    assert out.batch["rank"].tolist() == [i // per_rank for i in range(n)]
    assert "_hybridflow_pad_rows" not in out.meta_info


def test_dp_padding_stripped_when_method_returns_k_rows_per_row(echo):
    out = echo.sample(batch(3), n=2)
    assert out.batch["x"].tolist() == [0, 0, 1, 1, 2, 2]


def test_rank_zero_execute_returns_single_value(echo):
    assert echo.only_rank_zero() == 0


def test_future_chains_into_another_call(echo):
    fut = echo.scale_rows_async(batch(5))
    assert echo.total(fut) == [3 * sum(range(5))] * echo.world_size  # ONE_TO_ALL: whole value per rank
    again = echo.scale_rows(fut)  # DP: each rank gets its chunk of the future
    assert again.batch["x"].tolist() == [9 * i for i in range(5)]
    assert fut.get().batch["x"].tolist() == [3 * i for i in range(5)]


def test_worker_exception_surfaces_with_remote_traceback(echo):
    rank = echo.world_size - 1
    with pytest.raises(ValueError, match="row 3 has no prompt") as info:
        echo.fail_on(rank)
    assert "fail_on" in "".join(info.value.__notes__) + str(info.value)
    if echo.pool.executor == "ray":
        assert 'workers.py", line' in str(info.value) and "in fail_on" in str(info.value)  # remote frames


def test_mesh_dispatch_inprocess_single_rank():
    group = WorkerGroup(ResourcePool(1), MeshEcho, tp=1)
    assert group.compute(batch(3)).batch["x"].tolist() == [100, 101, 102]


def test_inprocess_rejects_several_ranks():
    with pytest.raises(ValueError, match="exactly one rank"):
        ResourcePool(world_size=2, executor="inprocess")


def test_colocate_inprocess_shares_process():
    import os

    groups = WorkerGroup.colocate(ResourcePool(1), a=Role(Echo, scale=2), b=Echo)
    assert groups["a"].info()[0]["pid"] == groups["b"].info()[0]["pid"] == os.getpid()
    assert groups["a"].scale_rows(batch(2)).batch["x"].tolist() == [0, 2]
    assert groups["b"].scale_rows(batch(2)).batch["x"].tolist() == [0, 1]
