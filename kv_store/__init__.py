"""The KV offload tier: pages in the Ray object store, owned by one long-lived store actor per node,
keyed by the prefix cache's hash chain under a model identity, LRU within a byte budget.

The engine uses `KVTierClient`; SGLang uses `kv_store.sglang_backend.HiCacheRayStore`.
"""

from kv_store.client import KVTierClient, TierStats
from kv_store.identity import ModelIdentity
from kv_store.messages import ROOT, StoreStats
from kv_store.store_actor import get_store, store_name

__all__ = [
    "KVTierClient",
    "ModelIdentity",
    "ROOT",
    "StoreStats",
    "TierStats",
    "get_store",
    "store_name",
]
