"""SGLang's HiCache storage contract, restated for where SGLang cannot be imported (CPU boxes).

Source: sgl-project/sglang `python/sglang/srt/mem_cache/hicache_storage.py` (`HiCacheStorage`,
`HiCacheStorageConfig`, `HiCacheStorageExtraInfo`), read at commit 001067ff (the 0.5 line), with
its callers: `storage/backend_factory.py` (`--hicache-storage-backend dynamic` imports
`extra_config["module_path"]`, takes `extra_config["class_name"]`, checks it subclasses
`HiCacheStorage`, and builds it as `cls(storage_config, kwargs)`, then calls
`register_mem_pool_host(host_pool)`), and `managers/cache_controller.py`, whose generic (non
zero-copy) page path is the one a dynamic backend gets unless `extra_config["interface_v1"]`:
- backup: `batch_set(keys, [host_pool.get_data_page(i, flat=True) ...])` -> bool, all stored;
- prefetch: `batch_exists(keys, extra_info)` -> int, the length of the leading run of keys held;
  then `batch_get(keys, [host_pool.get_dummy_flat_data_page() ...])` -> per key the filled target
  or None; the controller copies pages in order and stops at the first None.
Keys are SGLang's own per-page hash chain (hex strings). A method that returns None where a list or
an int is expected kills SGLang's storage thread for good, so these never do. Only the names,
signatures and return conventions are mirrored here; the real base is used whenever it imports.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class HiCacheStorageConfig:
    """What SGLang tells a backend about the process it runs in (one per TP/PP/CP rank)."""

    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    attn_cp_rank: int
    attn_cp_size: int
    is_mla_model: bool
    enable_storage_metrics: bool
    is_page_first_layout: bool
    model_name: str | None
    dp_rank: int = 0
    dp_size: int = 1
    tp_lcm_size: int | None = None
    should_split_heads: bool = False
    extra_config: dict | None = None


@dataclass
class HiCacheStorageExtraInfo:
    """Optional hints SGLang passes along: the hash keys of the pages before `keys`."""

    prefix_keys: list[str] | None = None
    extra_info: dict | None = None


class HiCacheStorage(ABC):
    """A key -> flat page tensor store, SGLang's L3 below device (L1) and host (L2) memory."""

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Called once after construction with SGLang's host KV pool (`HostKVCache`)."""
        self.mem_pool_host = mem_pool_host

    @abstractmethod
    def get(
        self, key: str, target_location: Any | None = None, target_sizes: Any | None = None
    ) -> torch.Tensor | None:
        """The page stored under key (written into target_location when given); None if absent."""

    @abstractmethod
    def batch_get(
        self, keys: list[str], target_locations: Any | None = None, target_sizes: Any | None = None
    ) -> list[torch.Tensor | None] | int:
        """Per key, its page or None."""

    @abstractmethod
    def set(
        self,
        key: str,
        value: Any | None = None,
        target_location: Any | None = None,
        target_sizes: Any | None = None,
    ) -> bool:
        """Store value under key; True on success."""

    @abstractmethod
    def batch_set(
        self,
        keys: list[str],
        values: Any | None = None,
        target_locations: Any | None = None,
        target_sizes: Any | None = None,
    ) -> bool:
        """Store every value under its key; True only if all were stored."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether key is stored."""

    def batch_exists(
        self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None
    ) -> int:
        """How many leading keys are stored (SGLang's default asks `exists` key by key)."""
        for index, key in enumerate(keys):
            if not self.exists(key):
                return index
        return len(keys)

    def clear(self) -> None:  # noqa: B027 (optional to override, like SGLang's)
        """Drop everything (SGLang's default: nothing)."""

    def get_stats(self) -> Any:
        """Storage metrics for SGLang's exporter, or None."""
        return None
