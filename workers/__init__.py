"""What runs on the ranks: training engines, rollout backends, the role workers and the
3D-HybridEngine. :func:`build_workers` places a run's roles (workers/placement.py)."""
from hybridflow.workers.placement import build_workers

__all__ = ["build_workers"]
