from edgeacc_ray.engine.tp.messages import WorkerSpec
from edgeacc_ray.engine.tp.ranks import Rank0Model, TensorParallelRanks, new_group_name, node_address, rank_bundle

__all__ = ["Rank0Model", "TensorParallelRanks", "WorkerSpec", "new_group_name", "node_address", "rank_bundle"]
