"""Ray-only behaviour: mesh dispatch over 4 ranks, colocation, pool splits, futures that stay out
of the controller, failures and timeouts."""
import pytest
import torch

from hybridflow import DataProto, ResourcePool, Role, WorkerError, WorkerGroup, WorkerTimeoutError

from .workers import Echo, MeshEcho

pytestmark = pytest.mark.usefixtures("ray_cluster")


def batch(n):
    return DataProto.from_dict({"x": torch.arange(n)}, {"uid": [f"u{i}" for i in range(n)]})


def test_mesh_dispatch_tp_peers_share_chunks_and_one_answers():
    pool = ResourcePool(world_size=4, executor="ray", num_cpus_per_worker=0.5)
    group = WorkerGroup(pool, MeshEcho, tp=2)
    try:
        out = group.compute(batch(6))
        assert out.batch["x"].tolist() == [100 + i for i in range(6)]
        # dp rank 0 = ranks {0, 1} answered by rank 1; dp rank 1 = ranks {2, 3} answered by rank 3
        assert out.batch["rank"].tolist() == [1, 1, 1, 3, 3, 3]
        assert group.seen() == [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]]
        assert group.mesh_info("train") == [(0, 2, False), (0, 2, True), (1, 2, False), (1, 2, True)]
        padded = group.compute(batch(3))  # 3 rows over dp=2: padded to 4, padding stripped
        assert padded.batch["x"].tolist() == [100, 101, 102]
    finally:
        group.shutdown()
        pool.shutdown()


def test_colocated_roles_share_one_process_per_rank_and_split_pools_do_not():
    pool = ResourcePool(world_size=4, executor="ray", num_cpus_per_worker=0.5)
    left, right = pool.split(2, 2)
    groups = WorkerGroup.colocate(left, actor=Role(Echo, scale=2), ref=Role(Echo, scale=5))
    other = WorkerGroup(right, Echo)
    try:
        actor_pids = [i["pid"] for i in groups["actor"].info()]
        assert actor_pids == [i["pid"] for i in groups["ref"].info()]
        assert len(set(actor_pids)) == 2
        assert not set(actor_pids) & {i["pid"] for i in other.info()}
        assert [i["rank"] for i in other.info()] == [0, 1]
        assert groups["ref"].scale_rows(batch(2)).batch["x"].tolist() == [0, 5]
    finally:
        for g in (*groups.values(), other):
            g.shutdown()
        pool.shutdown()


def test_future_between_groups_is_not_fetched_by_controller():
    pool = ResourcePool(world_size=2, executor="ray", num_cpus_per_worker=0.5)
    producer, consumer = WorkerGroup(pool, Echo, scale=2), WorkerGroup(pool, Echo, scale=10)
    try:
        fut = producer.scale_rows_async(batch(7))
        out = consumer.scale_rows(fut)
        assert out.batch["x"].tolist() == [20 * i for i in range(7)]
        assert producer._handle.fetched == 0  # the producer's outputs never came to the controller
        assert consumer._handle.fetched == 2
    finally:
        producer.shutdown()
        consumer.shutdown()
        pool.shutdown()


@pytest.fixture()
def fragile():
    pool = ResourcePool(world_size=2, executor="ray", num_cpus_per_worker=0.5, call_timeout_s=4)
    group = WorkerGroup(pool, Echo)
    yield group
    group.shutdown()
    pool.shutdown()


def test_dead_worker_raises_instead_of_hanging(fragile):
    with pytest.raises(WorkerError, match="rank 1 died"):
        fragile.die_on(1)


def test_slow_call_times_out_naming_ranks(fragile):
    with pytest.raises(WorkerTimeoutError, match=r"ranks \[0, 1\] did not finish within 4s"):
        fragile.sleep(30)


def test_stuck_collective_ends_with_error():
    # rank 1 never joins the all_reduce: gloo's 2 s timeout fires on rank 0 and the error surfaces
    pool = ResourcePool(world_size=2, executor="ray", num_cpus_per_worker=0.5, call_timeout_s=60)
    group = WorkerGroup(pool, Echo)
    try:
        with pytest.raises(RuntimeError) as info:
            group.allreduce_unless(1, 2.0)
        assert not isinstance(info.value, WorkerTimeoutError)  # the collective's own timeout, well before 60 s
        assert "rank 0" in "".join(info.value.__notes__)
    finally:
        group.shutdown()
        pool.shutdown()
