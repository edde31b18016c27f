"""Rank arithmetic of the 3D-HybridEngine: training layout (pp, tp, dp) -> generation layout (tg, dg).

Training ranks follow megatron-core's default order (``tp-cp-ep-dp-pp`` with cp = ep = 1)::

    rank = tp_rank + tp * (dp_rank + dp * pp_rank)

One training **model-parallel (MP) group** is the ``pp * tp`` ranks with the same ``dp_rank``; together
they hold one copy of the model. Generation runs with pipeline size 1 and tensor-parallel size ``tg``
(``tp % tg == 0``), so ``k = tp // tg`` consecutive training TP ranks form one generation TP slice.

**Micro-DP groups** (HybridFlow, section 5.4): the MP group splits into ``tg`` groups of
``s = pp * tp / tg`` ranks. Group ``j`` holds the training ranks whose TP rank lies in
``[j*k, (j+1)*k)``, over all pipeline stages::

    gen_tp_rank(rank)   = tp_rank // k                     (which generation shard the rank gets)
    micro_dp_rank(rank) = pp_rank * k + tp_rank % k        (its index inside the micro-DP group)
    gen_dp_rank(rank)   = dp_rank * s + micro_dp_rank      (dg = dp * s generation replicas)

An all-gather inside micro-DP group ``j`` gives every member generation TP shard ``j`` (all layers,
TP slice ``j`` of ``tg``), and the member's own training shard (TP slice ``tp_rank`` of ``tp``, its
stage's layers) is a part of it. The generation TP groups are the ``tg`` ranks with the same
``(dp_rank, micro_dp_rank)``: strided over the training TP ranks, so no weight moves between them.
"""
from __future__ import annotations

import dataclasses
from typing import List, Tuple

__all__ = ["Layout"]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Training layout (pp, tp, dp) and generation tensor-parallel size tg (generation pp = 1)."""

    pp: int
    tp: int
    dp: int
    tg: int

    def __post_init__(self):
        for key in ("pp", "tp", "dp", "tg"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"hybrid engine layout: {key} must be a positive int, got {value!r}")
        if self.tp % self.tg:
            raise ValueError(f"hybrid engine layout: generation tensor-parallel size tg={self.tg} must divide "
                             f"the training tensor-parallel size tp={self.tp} (the training shard must lie "
                             f"inside the generation shard)")

    # ---- sizes
    @property
    def world(self) -> int:
        return self.pp * self.tp * self.dp

    @property
    def k(self) -> int:
        """Training TP ranks per generation TP slice (``tp // tg``)."""
        return self.tp // self.tg

    @property
    def micro_dp_size(self) -> int:
        """``s = pp * tp / tg``: ranks per micro-DP group."""
        return self.pp * self.k

    @property
    def gen_dp(self) -> int:
        """``dg = world / tg``: generation replicas."""
        return self.world // self.tg

    # ---- training coordinates
    def train_rank(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return tp_rank + self.tp * (dp_rank + self.dp * pp_rank)

    def train_coords(self, rank: int) -> Tuple[int, int, int]:
        """``(pp_rank, dp_rank, tp_rank)`` of a global rank."""
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} outside the world of {self.world} ranks")
        tp_rank = rank % self.tp
        dp_rank = (rank // self.tp) % self.dp
        return rank // (self.tp * self.dp), dp_rank, tp_rank

    def mp_group(self, rank: int) -> List[int]:
        """The training model-parallel group of ``rank`` (same dp rank), ordered (pp, tp)."""
        _, dp_rank, _ = self.train_coords(rank)
        return [self.train_rank(p, dp_rank, t) for p in range(self.pp) for t in range(self.tp)]

    def mp_groups(self) -> List[List[int]]:
        return [self.mp_group(self.train_rank(0, d, 0)) for d in range(self.dp)]

    # ---- generation coordinates
    def gen_tp_rank(self, rank: int) -> int:
        return self.train_coords(rank)[2] // self.k

    def micro_dp_rank(self, rank: int) -> int:
        pp_rank, _, tp_rank = self.train_coords(rank)
        return pp_rank * self.k + tp_rank % self.k

    def gen_dp_rank(self, rank: int) -> int:
        return self.train_coords(rank)[1] * self.micro_dp_size + self.micro_dp_rank(rank)

    def micro_dp_group(self, rank: int) -> List[int]:
        """Ranks of ``rank``'s micro-DP group, ordered by micro-DP rank."""
        _, dp_rank, tp_rank = self.train_coords(rank)
        j = tp_rank // self.k
        return [self.train_rank(p, dp_rank, j * self.k + i) for p in range(self.pp) for i in range(self.k)]

    def micro_dp_groups(self) -> List[List[int]]:
        return [self.micro_dp_group(self.train_rank(0, d, j * self.k)) for d in range(self.dp) for j in range(self.tg)]

    def gen_tp_group(self, rank: int) -> List[int]:
        """Ranks of ``rank``'s generation TP group, ordered by generation TP rank."""
        pp_rank, dp_rank, tp_rank = self.train_coords(rank)
        return [self.train_rank(pp_rank, dp_rank, j * self.k + tp_rank % self.k) for j in range(self.tg)]

    def gen_tp_groups(self) -> List[List[int]]:
        return [self.gen_tp_group(self.train_rank(p, d, i))
                for d in range(self.dp) for p in range(self.pp) for i in range(self.k)]

    def train_tp_ranks_of_gen_shard(self, gen_tp_rank: int) -> range:
        """Training TP ranks whose shards make up generation TP shard ``gen_tp_rank``."""
        return range(gen_tp_rank * self.k, (gen_tp_rank + 1) * self.k)
