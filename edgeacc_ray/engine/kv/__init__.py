"""KV pages: the block manager (ref-counted pages and the prefix cache), the shared storage Semi-PD
puts the pool in (shared memory on CPU, one CUDA IPC allocation on GPU), and `KVTier`, the engine's
side of the KV offload tier (`enable_hierarchical_cache`; SGLang calls it HiCache)."""

from edgeacc_ray.engine.kv.block_manager import BlockManager
from edgeacc_ray.engine.kv.cuda_ipc_storage import (
    CudaMappedStorage,
    CudaStorageSpec,
    export_cuda,
    map_cuda_storage,
)
from edgeacc_ray.engine.kv.shared_arena import process_alive, sweep_stale_segments
from edgeacc_ray.engine.kv.tier import KVTier, PrefixLoad, require_ray
from edgeacc_ray.engine.kv.unified_storage import MappedStorage, StorageSpec, export, map_storage

__all__ = [
    "BlockManager",
    "CudaMappedStorage",
    "CudaStorageSpec",
    "KVTier",
    "MappedStorage",
    "PrefixLoad",
    "StorageSpec",
    "export",
    "export_cuda",
    "map_cuda_storage",
    "map_storage",
    "process_alive",
    "require_ray",
    "sweep_stale_segments",
]
