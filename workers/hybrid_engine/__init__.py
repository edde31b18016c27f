"""3D-HybridEngine: reshard the actor from the training layout (pp, tp, dp) to the generation layout
(tg, dg) by all-gathers inside micro-DP groups (:class:`MicroDPReshard`), with the naive full gather
(:class:`NaiveReshard`) kept as the baseline. See docs/design/hybrid_engine.md."""
from .groups import Layout
from .reshard import MicroDPReshard, NaiveReshard, ReshardStats, ShardSpec, gen_slice

__all__ = ["Layout", "MicroDPReshard", "NaiveReshard", "ReshardStats", "ShardSpec", "gen_slice"]
