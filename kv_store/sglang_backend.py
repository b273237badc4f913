"""The KV tier as SGLang's HiCache storage backend, so SGLang engines on a node share the tier.

Start SGLang with
    --enable-hierarchical-cache --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "edgeacc_ray", "module_path":
        "kv_store.sglang_backend", "class_name": "HiCacheRayStore", "kv_cache_offload_memory_gb": 8}'
Optional extra-config keys: "ray_address" (default "auto": the node's Ray cluster; SGLang's
scheduler processes are not Ray workers, so they connect as drivers), "store_name", "timeout_s".

SGLang's pages are flat tensors keyed by its own hash chain; the identity is the model name, the
KV dtype and page size, the host layout and this process's parallel rank (MLA ranks share one
copy), so SGLang pages never mix with the native engine's or another model's. SGLang's generic
`batch_set` names no parents, so each call's keys are stored as a chain of their own.
"""

from __future__ import annotations

from typing import Any

import ray
import torch

from kv_store.client import KVTierClient
from kv_store.identity import ModelIdentity
from kv_store.messages import ROOT

try:
    from sglang.srt.mem_cache.hicache_storage import (
        HiCacheStorage,
        HiCacheStorageConfig,
        HiCacheStorageExtraInfo,
    )
except ImportError:  # no SGLang here (CPU): the documented copy of its contract
    from kv_store.hicache_contract import (
        HiCacheStorage,
        HiCacheStorageConfig,
        HiCacheStorageExtraInfo,
    )

DEFAULT_OFFLOAD_MEMORY_GB = 4.0


class HiCacheRayStore(HiCacheStorage):
    """Serves nothing until SGLang registers its host pool (which fixes the page format): until
    then every read misses and every write fails, as SGLang expects of an unavailable store."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict | None = None) -> None:
        """`kwargs`: the factory's extra arguments; this backend takes its settings from
        `storage_config.extra_config` instead."""
        self._config = storage_config
        self._extra = storage_config.extra_config or {}
        if not ray.is_initialized():
            ray.init(address=self._extra.get("ray_address", "auto"), log_to_driver=False)
        self._client: KVTierClient | None = None

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        page = mem_pool_host.get_dummy_flat_data_page()
        identity = ModelIdentity(
            model=self._config.model_name or "",
            dtype=page.dtype,
            page_shape=(page.numel(),),
            variant=_variant(self._config, mem_pool_host.layout),
        )
        gb = float(self._extra.get("kv_cache_offload_memory_gb", DEFAULT_OFFLOAD_MEMORY_GB))
        self._client = KVTierClient(
            identity,
            int(gb * 2**30),
            store_name=self._extra.get("store_name"),
            timeout_s=float(self._extra.get("timeout_s", 1.0)),
        )

    def get(
        self, key: str, target_location: Any | None = None, target_sizes: Any | None = None
    ) -> torch.Tensor | None:
        return self.batch_get([key], None if target_location is None else [target_location])[0]

    def batch_get(
        self, keys: list[str], target_locations: Any | None = None, target_sizes: Any | None = None
    ) -> list[torch.Tensor | None]:
        """The leading stored pages as new flat tensors, None for the rest. A target only vets the
        format (SGLang copies the returned page into its pool; older SGLang passed one shared target)."""
        pages = (
            self._client.load([key.encode() for key in keys])
            if self._client is not None and keys
            else None
        )
        found = 0 if pages is None else len(pages)
        out: list[torch.Tensor | None] = [None] * len(keys)
        for index in range(found):
            target = None if target_locations is None else target_locations[index]
            if target is not None and (
                target.numel() != pages.shape[1] or target.dtype != pages.dtype
            ):
                break
            out[index] = pages[index]
        return out

    def set(
        self,
        key: str,
        value: Any | None = None,
        target_location: Any | None = None,
        target_sizes: Any | None = None,
    ) -> bool:
        return value is not None and self.batch_set([key], [value])

    def batch_set(
        self,
        keys: list[str],
        values: Any | None = None,
        target_locations: Any | None = None,
        target_sizes: Any | None = None,
    ) -> bool:
        if self._client is None or values is None or len(values) != len(keys) or not keys:
            return False
        identity = self._client.identity
        if any(v.numel() != identity.page_shape[0] or v.dtype != identity.dtype for v in values):
            return False
        pages = torch.stack([v.reshape(-1) for v in values])
        return self._client.put_pages(ROOT, [key.encode() for key in keys], pages) == len(keys)

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def batch_exists(
        self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None
    ) -> int:
        if self._client is None or not keys:
            return 0
        return self._client.match([key.encode() for key in keys])


def _variant(config: HiCacheStorageConfig, layout: str) -> str:
    """This rank's slice of the KV. Older SGLang configs lack the pipeline and context-parallel
    fields (no such parallelism then)."""
    variant = f"sglang/{layout}/pp{getattr(config, 'pp_rank', 0)}of{getattr(config, 'pp_size', 1)}"
    if not config.is_mla_model:  # MLA's latent KV is the same on every TP rank
        variant += f"/tp{config.tp_rank}of{config.tp_size}"
    if getattr(config, "attn_cp_size", 1) > 1:
        variant += f"/cp{config.attn_cp_rank}of{config.attn_cp_size}"
    return variant
