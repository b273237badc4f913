"""Tensor parallelism of the native engine: rank 0 (the engine's process) starts and drives
ranks 1..N-1 as Ray actors on the same node, one collective group, bounded so a lost rank fails
the engine instead of hanging it."""

from edgeacc_ray.engine.tp.messages import WorkerSpec
from edgeacc_ray.engine.tp.ranks import (
    Rank0Model,
    TensorParallelRanks,
    new_group_name,
    node_address,
    rank_bundle,
)

__all__ = [
    "Rank0Model",
    "TensorParallelRanks",
    "WorkerSpec",
    "new_group_name",
    "node_address",
    "rank_bundle",
]
