"""The engine's side of the KV offload tier (kv_store/, the native engine's SGLang HiCache): pages that
are reused are written to the node's store, and the part of an admitted prompt's prefix that the
device pool lacks is read back from it while the running batch goes on.

Selective write-through (SGLang's write_through_selective, at its threshold of two uses): a page is
sent when a new prompt's prefix match reuses it for the first time (`BlockManager.take_reused_pages`),
once per stay in the pool. A page used once, the prompt of a request that never recurs, is never
sent: writing every page kept the store actor busy (6% of a core at c=64 on random prompts) for
nothing. A conversation's pages are reused by its next turn, so they reach the store before the
pool evicts them, and other replicas on the node can read them. Pages that came from the tier are never sent
back. The step loop only gathers the listed pages out of the pool (one index copy); the tier
client's thread packs and sends them in batches, and drops them if it falls behind.

Reads: at admission, after the device match, the prompt's remaining full-page keys (never the page
holding its last token, as on the device) go to one `load_async`; the sequence waits LOADING:
admitted, its reservation counted, its device prefix held. When the read is back its pages are
copied into fresh pool pages and keyed as if computed, and it joins the batch. A miss, a failure or
a timeout reads as no pages: the prompt is computed. Only the store knows what it holds, so pages
that are new (a conversation's next message) are asked for too: such a prompt starts a step later.

The store is a Ray actor, so the tier needs a Ray cluster: an engine asked for it in a process not
connected to one (the offline `LLM` without `ray.init()`) refuses to start with `TierUnavailable`
rather than start a cluster behind its caller's back.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ray
import torch

from edgeacc_ray.engine.kv.block_manager import BlockManager
from edgeacc_ray.engine.request import HiCacheStats, Sequence
from edgeacc_ray.prefix_keys import full_page_keys
from kv_store import KVTierClient, ModelIdentity, TierStats

MIN_LOAD_PAGES = (
    2  # fewer pages are computed: a read costs a store round trip and a step of waiting
)
STORE_STATS_PERIOD_S = (
    5.0  # the store's counters are asked for (off the caller's thread) at most this often
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class TierUnavailable(RuntimeError):
    """enable_hierarchical_cache is set but this process is not connected to a Ray cluster."""


def require_ray() -> None:
    """Raise TierUnavailable unless this process is connected to a Ray cluster."""
    if not ray.is_initialized():
        raise TierUnavailable(
            "enable_hierarchical_cache needs a Ray cluster (the tier's store is a Ray actor): "
            "call ray.init() before starting the engine, or turn the tier off"
        )


@dataclass
class PrefixLoad:
    """A tier read for an admitted sequence: `keys` continue its device prefix, which ends at page `start`."""

    start: int
    keys: list[bytes]
    future: cf.Future  # -> torch.Tensor [n <= len(keys), *page_shape] on the CPU, or None


def model_fingerprint(model_path: str | Path) -> str:
    """The model's path plus a digest of its config and the names, sizes and times of its weight
    files: pages of other weights (a rebuilt or replaced checkpoint) never match."""
    path = Path(model_path).resolve()
    digest = hashlib.blake2b(digest_size=8)
    config = path / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for file in sorted(path.iterdir()) if path.is_dir() else [path]:
        if file.suffix in WEIGHT_SUFFIXES:
            stat = file.stat()
            digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return f"{path}@{digest.hexdigest()}"


def page_shape(kv_cache: torch.Tensor) -> tuple[int, ...]:
    """One page of the pool [layers, 2, Hkv, num_pages, page_size, D]: the pool without its pages dimension."""
    return tuple(kv_cache.shape[:3]) + tuple(kv_cache.shape[4:])


class KVTier:
    """Owns the tier client; touched by the engine's step loop only, except `stats` (any thread)."""

    def __init__(
        self, client: KVTierClient, block_manager: BlockManager, kv_cache: torch.Tensor
    ) -> None:
        self.client = client
        self.block_manager = block_manager
        self.kv_cache = kv_cache  # [layers, 2, Hkv, num_pages, page_size, D]
        self.notify: Callable[[], None] | None = (
            None  # called from a reader thread when a read is back
        )
        self.pages_written = self.loads = self.pages_loaded = self.load_misses = 0
        self._lock = threading.Lock()
        self._poller = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-tier-stats")
        self._store_poll: cf.Future | None = None
        self._store_polled_at = 0.0
        self._tier_stats: TierStats | None = None

    @classmethod
    def connect(
        cls,
        model_path: str | Path,
        budget_bytes: int,
        block_manager: BlockManager,
        kv_cache: torch.Tensor,
        store_name: str | None = None,
    ) -> "KVTier":
        """The tier of this node's store (or `store_name`'s), for pages of this model and pool layout."""
        require_ray()
        identity = ModelIdentity(
            model_fingerprint(model_path), kv_cache.dtype, page_shape(kv_cache)
        )
        return cls(
            KVTierClient(identity, budget_bytes, store_name=store_name), block_manager, kv_cache
        )

    # -- writes ---------------------------------------------------------------------------------
    def write_reused(self) -> None:
        """Send the pages reused for the first time since the last call. Call it before anything can
        allocate (a page freed meanwhile may be reused and overwritten)."""
        runs = self.block_manager.take_reused_pages()
        if not runs:
            return
        ids = torch.tensor(
            [page for run in runs for page in run.pages], device=self.kv_cache.device
        )
        pages = self.kv_cache.index_select(3, ids).permute(
            3, 0, 1, 2, 4, 5
        )  # a copy: [n, layers, 2, Hkv, P, D]
        start = 0
        for run in runs:
            end = start + len(run.keys)
            if self.client.store_pages(run.parent, run.keys, pages[start:end]):
                self.pages_written += len(run.keys)
            start = end

    # -- reads ----------------------------------------------------------------------------------
    def start_load(self, seq: Sequence) -> bool:
        """Ask the tier for the full pages of seq's tokens past its device prefix. False (nothing
        asked) when too few are missing; else seq.prefix_load is set."""
        size = self.block_manager.page_size
        start, end = len(seq.page_table), seq.num_cacheable_tokens // size
        if end - start < MIN_LOAD_PAGES:
            return False
        keys = list(full_page_keys(seq.token_ids, size, start, end, seq.last_page_key))
        future = self.client.load_async(keys)
        future.add_done_callback(self._loaded)
        seq.prefix_load = PrefixLoad(start, keys, future)
        self.loads += 1
        return True

    def finish_load(self, seq: Sequence) -> None:
        """Take in the pages of seq's finished read: they extend its prefix in the pool."""
        load, seq.prefix_load = seq.prefix_load, None
        future = load.future
        pages = None if future.cancelled() or future.exception() is not None else future.result()
        if pages is None:
            self.load_misses += 1
            return
        fresh = self.block_manager.attach(seq, load.keys[: len(pages)])
        if fresh:
            rows = torch.tensor([index for index, _ in fresh])
            ids = torch.tensor([page for _, page in fresh], device=self.kv_cache.device)
            self.kv_cache.index_copy_(
                3, ids, pages[rows].permute(1, 2, 3, 0, 4, 5).to(self.kv_cache.device)
            )
        self.pages_loaded += len(fresh)
        if (
            seq.num_output_tokens == 0
        ):  # a preempted sequence keeps the counts of its first admission
            seq.num_cached_tokens = seq.num_computed_tokens
            seq.num_host_cached_tokens = len(fresh) * self.block_manager.page_size

    def _loaded(self, _: cf.Future) -> None:
        if self.notify is not None:
            self.notify()

    # -- introspection --------------------------------------------------------------------------
    def stats(self) -> HiCacheStats:
        """This engine's counters and the store's as of its last answer (asked for in the background:
        a scrape never waits on the store)."""
        with self._lock:
            poll = self._store_poll
            if poll is not None and poll.done():
                self._tier_stats, self._store_poll = poll.result(), None
            if (
                self._store_poll is None
                and time.monotonic() - self._store_polled_at >= STORE_STATS_PERIOD_S
            ):
                self._store_polled_at = time.monotonic()
                self._store_poll = self._poller.submit(self.client.stats)
            tier = self._tier_stats
        store = tier.store if tier is not None else None
        return HiCacheStats(
            pages_written_total=self.pages_written,
            loads_total=self.loads,
            pages_loaded_total=self.pages_loaded,
            load_misses_total=self.load_misses,
            page_size=self.block_manager.page_size,
            pages_dropped_total=tier.dropped_pages if tier is not None else 0,
            failed_calls_total=tier.failed_calls if tier is not None else 0,
            store_pages=store.pages if store is not None else 0,
            store_bytes=store.bytes_held if store is not None else 0,
            store_budget_bytes=store.budget_bytes if store is not None else 0,
            page_nbytes=self.client.identity.page_nbytes,
        )

    def close(self) -> None:
        """Send what is queued (the store keeps the pages), then stop the client's threads."""
        self._poller.shutdown(wait=False, cancel_futures=True)
        self.client.close()
