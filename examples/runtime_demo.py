"""hybridflow runtime demo: two worker groups, a future between them, DP and mesh dispatch.

    python examples/runtime_demo.py --executor inprocess
    python examples/runtime_demo.py --executor ray --world-size 2
"""
import argparse

import torch
import torch.distributed as dist

from hybridflow import DataProto, Dispatch, ResourcePool, Worker, WorkerGroup, register


class Rollout(Worker):
    """Data parallel: every rank gets an equal share of the prompts."""

    @register(dispatch=Dispatch.DP_COMPUTE_PROTO, blocking=False)
    def generate(self, prompts: DataProto, n: int) -> DataProto:
        out = prompts.repeat(n)  # n samples per prompt: a DP method may return k rows per input row
        sample = torch.arange(len(out)) % n
        out.batch["length"] = (out.batch["prompt_id"] * 3 + sample) % 5 + 1  # pretend generation
        out.batch["generated_on"] = torch.full((len(out),), self.rank)
        return out


class Scorer(Worker):
    """Tensor parallel over `tp` ranks: each holds a slice of the weights, an all_reduce adds the parts."""

    WEIGHT = torch.tensor([1.0, 0.5, 0.1, -1.0])

    def __init__(self, tp: int):
        super().__init__()
        if self.world_size % tp or len(self.WEIGHT) % tp:
            raise ValueError(f"tp={tp} must divide the world size {self.world_size} and {len(self.WEIGHT)}")
        self.init_distributed()  # gloo on CPU, nccl on GPU; the executor has set RANK, WORLD_SIZE, MASTER_*
        dp_rank, self.tp_rank = divmod(self.rank, tp)
        # Declare the layout: the tp ranks of one dp group receive the same rows; the last one answers.
        self.set_dispatch_info("tp", dp_rank=dp_rank, dp_size=self.world_size // tp, collect=self.tp_rank == tp - 1)
        groups = [dist.new_group(list(range(first, first + tp))) for first in range(0, self.world_size, tp)]
        self.tp, self.tp_group = tp, groups[dp_rank]
        self.weight = self.WEIGHT.chunk(tp)[self.tp_rank]

    @register(dispatch=Dispatch.MESH_PROTO, mesh="tp")
    def score(self, data: DataProto) -> DataProto:
        length, prompt = data.batch["length"].float(), data.batch["prompt_id"].float()
        features = torch.stack([length, prompt, length * prompt, torch.ones_like(length)], dim=1)
        partial = features.chunk(self.tp, dim=1)[self.tp_rank] @ self.weight
        dist.all_reduce(partial, group=self.tp_group)  # every tp rank now holds the full score
        data.batch["score"] = partial
        data.batch["scored_by"] = torch.full((len(data),), self.rank)
        return data

    @register(dispatch=Dispatch.ONE_TO_ALL)
    def layout(self) -> str:
        dp_rank, dp_size, answers = self.get_dispatch_info("tp")
        return f"rank {self.rank}: dp {dp_rank}/{dp_size}, tp {self.tp_rank}/{self.tp}, answers={answers}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executor", choices=["inprocess", "ray"], default="inprocess")
    parser.add_argument("--world-size", type=int, help="ranks per group (default: 1 inprocess, 2 ray)")
    parser.add_argument("--tp", type=int, help="tensor-parallel size of the scorer (default: the world size)")
    args = parser.parse_args()
    world = args.world_size or (2 if args.executor == "ray" else 1)

    pool = ResourcePool(world_size=world, executor=args.executor, num_cpus_per_worker=0.5)
    rollout = WorkerGroup(pool, Rollout)                  # on Ray: one process per rank ...
    scorer = WorkerGroup(pool, Scorer, tp=args.tp or world)  # ... and one more per rank for this group
    try:
        print("scorer layout:", *scorer.layout(), sep="\n  ")  # ONE_TO_ALL: a list, one entry per rank
        prompts = DataProto.from_dict({"prompt_id": torch.arange(3)}, {"text": ["1+1", "2+3", "7*6"]})
        samples = rollout.generate(prompts, n=2)  # a Future: on Ray the rows stay on the rollout ranks
        scored = scorer.score(samples)            # the scorer ranks fetch the rows themselves
        for i in range(len(scored)):
            b = scored.batch
            print(f"row {i}: prompt={scored.non_tensor_batch['text'][i]!r} length={b['length'][i].item()} "
                  f"score={b['score'][i].item():.2f} generated_on=rank{b['generated_on'][i].item()} "
                  f"scored_by=rank{b['scored_by'][i].item()}")
    finally:
        rollout.shutdown()
        scorer.shutdown()
        pool.shutdown()


if __name__ == "__main__":
    main()
