"""The tier behind SGLang's HiCache storage contract, driven the way SGLang drives it.

Where SGLang imports, the backend subclasses its real `HiCacheStorage`; elsewhere (CPU boxes) the
documented copy of the contract (kv_store/hicache_contract.py). This file plays SGLang's side: the
`dynamic` loader, a host KV pool with HostKVCache's page methods, and the cache controller's
generic backup (`batch_set`) and prefetch (`batch_exists`, then `batch_get` copied page by page).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import uuid

import pytest
import torch

from kv_store.sglang_backend import HiCacheStorage, HiCacheStorageConfig
from kv_store.store_actor import STORE_NAMESPACE

PAGE_SIZE, LAYERS, HEADS, HEAD_DIM = 16, 4, 2, 16


class LayerFirstHostPool:
    """SGLang's MHA host pool in its "layer_first" layout: kv_buffer [2, layers, tokens, heads, dim];
    a page is page_size consecutive token slots, handed to storage flattened."""

    layout = "layer_first"

    def __init__(self, num_tokens: int, dtype: torch.dtype = torch.bfloat16) -> None:
        self.page_size = PAGE_SIZE
        self.kv_buffer = torch.zeros(2, LAYERS, num_tokens, HEADS, HEAD_DIM, dtype=dtype)

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        page = self.kv_buffer[:, :, index : index + self.page_size]
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros(
            2 * LAYERS * self.page_size * HEADS * HEAD_DIM, dtype=self.kv_buffer.dtype
        )

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        self.kv_buffer[:, :, index : index + self.page_size] = data_page.reshape(
            2, LAYERS, self.page_size, HEADS, HEAD_DIM
        )


def sglang_keys(num_pages: int, seed: int = 0) -> list[str]:
    """A per-page SHA-256 chain of hex strings, the shape of SGLang's storage keys."""
    keys, prior = [], ""
    for page in range(num_pages):
        prior = hashlib.sha256(f"{prior}:{seed}:{page}".encode()).hexdigest()
        keys.append(prior)
    return keys


@pytest.fixture
def extra_config(ray_cluster):
    name = f"test-kv-sglang-{uuid.uuid4().hex[:8]}"
    yield {
        "backend_name": "edgeacc_ray",
        "module_path": "kv_store.sglang_backend",
        "class_name": "HiCacheRayStore",
        "kv_cache_offload_memory_gb": 0.01,
        "store_name": name,
        "timeout_s": 10.0,
    }
    try:
        ray_cluster.kill(ray_cluster.get_actor(name, namespace=STORE_NAMESPACE), no_restart=True)
    except ValueError:
        pass


def storage_config(extra_config: dict, tp_rank: int = 0) -> HiCacheStorageConfig:
    values = dict(
        tp_rank=tp_rank,
        tp_size=2,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=False,
        enable_storage_metrics=False,
        is_page_first_layout=False,
        model_name="Qwen/Qwen3-0.6B",
        extra_config=extra_config,
    )
    names = {
        field.name for field in dataclasses.fields(HiCacheStorageConfig)
    }  # SGLang versions differ
    return HiCacheStorageConfig(**{name: value for name, value in values.items() if name in names})


def load_backend(config: HiCacheStorageConfig, host_pool: LayerFirstHostPool | None):
    """What `--hicache-storage-backend dynamic` does (storage/backend_factory.py), then the controller's
    `register_mem_pool_host`."""
    backend_class = getattr(
        importlib.import_module(config.extra_config["module_path"]),
        config.extra_config["class_name"],
    )
    assert issubclass(backend_class, HiCacheStorage)
    backend = backend_class(config, {})
    if host_pool is not None:
        backend.register_mem_pool_host(host_pool)
    return backend


def backup(backend, pool: LayerFirstHostPool, keys: list[str]) -> bool:
    """The controller's `_generic_page_set`."""
    return backend.batch_set(
        keys, [pool.get_data_page(i * PAGE_SIZE, flat=True) for i in range(len(keys))]
    )


def prefetch(backend, pool: LayerFirstHostPool, keys: list[str]) -> int:
    """The controller's storage hit query and `_generic_page_get`: pages restored, in order."""
    hit = backend.batch_exists(keys)
    pages = backend.batch_get(keys[:hit], [pool.get_dummy_flat_data_page() for _ in range(hit)])
    restored = 0
    for i, page in enumerate(pages):
        if page is None:
            break
        pool.set_from_flat_data_page(i * PAGE_SIZE, page)
        restored += 1
    return restored


def test_sglang_pages_round_trip_and_are_shared_by_engines_on_the_node(extra_config):
    source = LayerFirstHostPool(8 * PAGE_SIZE)
    source.kv_buffer.normal_()
    keys = sglang_keys(8)
    writer = load_backend(storage_config(extra_config), source)
    assert backup(writer, source, keys)
    assert writer.batch_exists(keys + sglang_keys(2, seed=1)) == 8

    target = LayerFirstHostPool(8 * PAGE_SIZE)
    reader = load_backend(
        storage_config(extra_config), target
    )  # another SGLang engine on this node
    assert prefetch(reader, target, keys) == 8
    assert torch.equal(target.kv_buffer, source.kv_buffer)

    key = sglang_keys(1, seed=2)[0]
    assert not reader.exists(key) and reader.get(key, target.get_dummy_flat_data_page()) is None
    page = torch.randn(target.get_dummy_flat_data_page().shape).to(torch.bfloat16)
    assert reader.set(key, page)
    assert reader.exists(key) and torch.equal(
        reader.get(key, target.get_dummy_flat_data_page()), page
    )


def test_other_ranks_dtypes_and_unregistered_backends_miss(extra_config):
    pool = LayerFirstHostPool(4 * PAGE_SIZE)
    pool.kv_buffer.normal_()
    keys = sglang_keys(4)
    assert backup(load_backend(storage_config(extra_config), pool), pool, keys)

    other_rank = load_backend(
        storage_config(extra_config, tp_rank=1), LayerFirstHostPool(4 * PAGE_SIZE)
    )
    other_dtype = load_backend(
        storage_config(extra_config), LayerFirstHostPool(4 * PAGE_SIZE, torch.float16)
    )
    unregistered = load_backend(storage_config(extra_config), None)
    for backend in (other_rank, other_dtype, unregistered):
        assert backend.batch_exists(keys) == 0
        assert (
            backend.batch_get(keys, [pool.get_dummy_flat_data_page() for _ in keys]) == [None] * 4
        )
    assert not unregistered.batch_set(keys, [pool.get_data_page(i * PAGE_SIZE) for i in range(4)])

    same = load_backend(storage_config(extra_config), LayerFirstHostPool(4 * PAGE_SIZE))
    wrong_target = torch.zeros(
        7, dtype=torch.bfloat16
    )  # a target of another format is never filled
    assert same.batch_get(keys[:2], [wrong_target, wrong_target]) == [None, None]
    assert not same.batch_set(keys[:1], [torch.zeros(7, dtype=torch.bfloat16)])
