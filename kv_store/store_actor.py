"""The node's KV store: a long-lived Ray actor that owns packed page objects in the object store.

The store `ray.put`s the bytes it is sent, so it owns them and they outlive the engine replica
that produced them (an object dies with its owner). One store per node, found by name
in its own namespace (any driver or replica on the node finds the same one), detached, and
restarted by Ray if it dies: a restarted store is empty, which its clients see as misses.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import ray
from ray.actor import ActorHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kv_store.chain_index import ChainIndex
from kv_store.messages import PageLocation, PutBatch, PutResult, StoreStats

logger = logging.getLogger(__name__)

STORE_NAMESPACE = "edgeacc_kv"
MAX_STORE_SHARE = 0.5
"""Most of the node's object store the tier may take: Ray spills at 80% full, and others use it too."""


def store_name(node_id: str) -> str:
    return f"edgeacc-kv-store-{node_id}"


class KVStore:
    def __init__(self, budget_bytes: int) -> None:
        self._index: ChainIndex[ray.ObjectRef] = ChainIndex(_fit_budget(budget_bytes))

    def put(self, batch: PutBatch) -> PutResult:
        """Keep the batch's new pages in one object of their own (see `ChainIndex.insert`)."""
        num_pages = batch.num_pages
        data = batch.data
        if not (
            batch.page_nbytes > 0
            and len(batch.checksums) == num_pages
            and isinstance(data, np.ndarray)
            and data.dtype == np.uint8
            and data.size == num_pages * batch.page_nbytes
        ):
            self._index.rejected += num_pages
            return PutResult(stored=0, present=0, rejected=num_pages)

        def make_object(indices: list[int]) -> ray.ObjectRef:
            if len(indices) == num_pages:
                return ray.put(data)
            return ray.put(data.reshape(num_pages, batch.page_nbytes)[indices].reshape(-1))

        return self._index.insert(
            batch.namespace, batch.segments, batch.page_nbytes, batch.checksums, make_object
        )

    def match(self, namespace: bytes, keys: Sequence[bytes]) -> int:
        return self._index.match(namespace, keys)

    def locate(self, namespace: bytes, keys: Sequence[bytes]) -> tuple[PageLocation, ...]:
        return tuple(
            PageLocation(found.handle, found.offset, found.nbytes, found.checksum)
            for found in self._index.locate(namespace, keys)
        )

    def stats(self) -> StoreStats:
        return self._index.stats()


_KVStoreActor = ray.remote(KVStore)


def get_store(budget_bytes: int, name: str | None = None) -> ActorHandle:
    """This node's store, created on first use. `budget_bytes` applies only when this call creates
    it; `name` (default: one per node) lets separate tiers share a node."""
    node_id = ray.get_runtime_context().get_node_id()
    return _KVStoreActor.options(
        name=name or store_name(node_id),
        namespace=STORE_NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        max_restarts=-1,
        num_cpus=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(budget_bytes)


def _fit_budget(budget_bytes: int) -> int:
    node_id = ray.get_runtime_context().get_node_id()
    capacity = next(
        int(n["Resources"].get("object_store_memory", 0))
        for n in ray.nodes()
        if n["NodeID"] == node_id
    )
    limit = int(capacity * MAX_STORE_SHARE)
    if budget_bytes > limit:
        logger.warning(
            "KV tier budget %d bytes exceeds %.0f%% of this node's object store (%d bytes); using %d",
            budget_bytes,
            MAX_STORE_SHARE * 100,
            capacity,
            limit,
        )
        return limit
    return budget_bytes
