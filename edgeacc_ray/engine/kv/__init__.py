from edgeacc_ray.engine.kv.block_manager import BlockManager
from edgeacc_ray.engine.kv.cuda_ipc_storage import CudaMappedStorage, CudaStorageSpec, export_cuda, map_cuda_storage
from edgeacc_ray.engine.kv.shared_arena import process_alive, sweep_stale_segments
from edgeacc_ray.engine.kv.tier import KVTier, PrefixLoad, require_ray
from edgeacc_ray.engine.kv.unified_storage import MappedStorage, StorageSpec, export, map_storage

__all__ = ["BlockManager", "CudaMappedStorage", "CudaStorageSpec", "KVTier", "MappedStorage", "PrefixLoad", "StorageSpec", "export", "export_cuda", "map_cuda_storage", "map_storage", "process_alive", "require_ray", "sweep_stale_segments"]
