"""The engine's handle on its node's KV tier.

Writes are fire-and-forget: `store_pages` queues and returns at once; one background thread packs
queued pages into objects of about `object_bytes` (a put costs ~1 ms whatever its size)
and sends them. Reads wait at most `timeout_s`, so call them off the step loop (`load_async`).
Every tier failure (store dead or restarting, object lost, bytes that fail their checksum, a
timeout, a full queue) reads as a miss or a dropped write, never as an exception.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.actor import ActorHandle

from kv_store.identity import ModelIdentity
from kv_store.messages import ChainSegment, PageLocation, PutBatch, PutResult, StoreStats
from kv_store.page_codec import pack_pages, unpack_pages
from kv_store.store_actor import get_store

logger = logging.getLogger(__name__)

_LINGER_OVER = object()


@dataclass(frozen=True)
class TierStats:
    """store: the store's counters (None when it did not answer). The rest count this client's
    losses: pages refused because the write queue was full, store calls that failed or timed out,
    and pages that came back with bad bytes."""

    store: StoreStats | None
    dropped_pages: int
    failed_calls: int
    corrupt_pages: int


@dataclass(frozen=True)
class _Pending:
    segment: ChainSegment
    pages: torch.Tensor  # [len(segment.keys), *page_shape]
    nbytes: int


class KVTierClient:
    """Thread-safe. `budget_bytes` sizes the store if this client is the one that creates it;
    `store_name` picks a store other than the node's own (separate tiers on one node). Reads give
    up after `timeout_s`; the sender waits up to `write_timeout_s` for a put (a store that is
    starting or restarting takes ~1-2 s), and holds at most `max_pending_bytes` of queued pages."""

    def __init__(
        self,
        identity: ModelIdentity,
        budget_bytes: int,
        *,
        store_name: str | None = None,
        object_bytes: int = 1 << 20,
        linger_s: float = 0.02,
        timeout_s: float = 1.0,
        write_timeout_s: float = 10.0,
        max_pending_bytes: int = 64 << 20,
    ) -> None:
        self.identity = identity
        self.timeout_s = timeout_s
        self._write_timeout_s = write_timeout_s
        self._budget_bytes = budget_bytes
        self._store_name = store_name
        self._pages_per_chunk = max(1, object_bytes // identity.page_nbytes)
        self._object_bytes = object_bytes
        self._linger_s = linger_s
        self._max_pending_bytes = max_pending_bytes
        self._lock = threading.Lock()
        self._handle: ActorHandle | None = None
        self._pending_bytes = 0
        self._closed = False
        self._dropped_pages = self._failed_calls = self._corrupt_pages = 0
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="kv-tier-sender", daemon=True)
        self._sender.start()
        self._readers = cf.ThreadPoolExecutor(max_workers=2, thread_name_prefix="kv-tier-reader")
        try:
            self._store()  # start the store now (asynchronously), while the engine loads its model
        except ray.exceptions.RayError as error:
            self._failed(error)

    def store_pages(self, parent: bytes, keys: Sequence[bytes], pages: torch.Tensor) -> bool:
        """Queue a chain's consecutive pages for the tier: keys[0]'s parent is `parent` (`ROOT` for
        a chain start), pages is [len(keys), *page_shape] on any device, and becomes the client's:
        pass a tensor nobody writes again (an index gather from the pool is a fresh copy; it may be a
        permuted view, the sender makes it contiguous). Returns at once; False if the pages were
        dropped (write queue full, client closed)."""
        self._check_pages(keys, pages)
        nbytes = len(keys) * self.identity.page_nbytes
        with self._lock:
            if self._closed or self._pending_bytes + nbytes > self._max_pending_bytes:
                self._dropped_pages += len(keys)
                return False
            self._pending_bytes += nbytes
        for chunk in self._chunks(parent, keys, pages):
            self._queue.put(chunk)
        return True

    def put_pages(self, parent: bytes, keys: Sequence[bytes], pages: torch.Tensor) -> int:
        """`store_pages`, but now, on the calling thread: how many of the leading pages the tier
        holds when it returns (stored now or before)."""
        self._check_pages(keys, pages)
        held = 0
        for chunk in self._chunks(parent, keys, pages):
            result = self._put([chunk])
            if result is None:
                break
            held += result.stored + result.present
            if result.rejected:
                break
        return held

    def match(self, keys: Sequence[bytes]) -> int:
        """How many leading keys the tier holds now (0 on any failure). A peek: counts no hit."""
        hits = self._call("match", self.identity.namespace, list(keys), timeout=self.timeout_s)
        return hits or 0

    def load(self, keys: Sequence[bytes]) -> torch.Tensor | None:
        """The pages of the leading keys the tier holds, intact, as a new CPU tensor
        [n, *page_shape] (n <= len(keys)); None on a miss or any failure."""
        if not keys:
            return None
        deadline = time.monotonic() + self.timeout_s
        locations: tuple[PageLocation, ...] | None = self._call(
            "locate", self.identity.namespace, list(keys), timeout=self.timeout_s
        )
        if not locations:
            return None
        refs = list(dict.fromkeys(location.object_ref for location in locations))
        try:
            buffers = ray.get(refs, timeout=max(0.0, deadline - time.monotonic()))
        except ray.exceptions.RayError as error:
            self._failed(error)
            return None
        pages = unpack_pages(locations, dict(zip(refs, buffers)), self.identity)
        if len(pages) < len(locations):
            with self._lock:
                self._corrupt_pages += 1
            logger.warning(
                "KV tier: page %d of %d failed its size or checksum check; using the pages before it",
                len(pages),
                len(locations),
            )
        return pages if len(pages) else None

    def load_async(self, keys: Sequence[bytes]) -> cf.Future[torch.Tensor | None]:
        """`load` on one of the client's reader threads; poll the future from the step loop."""
        return self._readers.submit(self.load, list(keys))

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every page queued before this call has been sent and answered."""
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout_s)

    def stats(self) -> TierStats:
        store = self._call("stats", timeout=self.timeout_s)
        with self._lock:
            return TierStats(store, self._dropped_pages, self._failed_calls, self._corrupt_pages)

    def close(self) -> None:
        """Send what is queued, then stop the client's threads (the store and its pages stay)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(None)
        self._sender.join(timeout=self._write_timeout_s)
        self._readers.shutdown(wait=False, cancel_futures=True)

    def _check_pages(self, keys: Sequence[bytes], pages: torch.Tensor) -> None:
        if (
            pages.shape != (len(keys), *self.identity.page_shape)
            or pages.dtype != self.identity.dtype
        ):
            raise ValueError(
                f"pages {tuple(pages.shape)} {pages.dtype} do not match {len(keys)} keys of "
                f"{self.identity.page_shape} {self.identity.dtype}"
            )

    def _chunks(self, parent: bytes, keys: Sequence[bytes], pages: torch.Tensor) -> list[_Pending]:
        """Split a run of pages into pieces of at most one object's worth, each continuing the last."""
        step, chunks = self._pages_per_chunk, []
        for start in range(0, len(keys), step):
            chunk_keys = tuple(keys[start : start + step])
            chunks.append(
                _Pending(
                    ChainSegment(parent if start == 0 else keys[start - 1], chunk_keys),
                    pages[start : start + step],
                    len(chunk_keys) * self.identity.page_nbytes,
                )
            )
        return chunks

    def _send_loop(self) -> None:
        batch: list[_Pending] = []
        deadline = 0.0
        while True:
            try:
                item = self._queue.get(
                    timeout=max(0.0, deadline - time.monotonic()) if batch else None
                )
            except queue.Empty:
                item = _LINGER_OVER
            if isinstance(item, _Pending):
                if not batch:
                    deadline = time.monotonic() + self._linger_s
                batch.append(item)
                if sum(p.nbytes for p in batch) < self._object_bytes:
                    continue
            if batch:
                self._put(batch)
                with self._lock:
                    self._pending_bytes -= sum(p.nbytes for p in batch)
                batch = []
            if isinstance(item, threading.Event):
                item.set()
            elif item is None:
                return

    def _put(self, batch: list[_Pending]) -> PutResult | None:
        try:
            data, checksums = pack_pages([p.pages for p in batch])
        except (
            Exception
        ):  # a page we cannot read (a device error) is a dropped write, not a dead sender
            logger.exception(
                "KV tier: could not pack %d pages; dropped", sum(len(p.segment.keys) for p in batch)
            )
            return None
        put = PutBatch(
            self.identity.namespace,
            self.identity.page_nbytes,
            tuple(p.segment for p in batch),
            checksums,
            data,
        )
        return self._call("put", put, timeout=self._write_timeout_s)

    def _call(self, method: str, *args: Any, timeout: float) -> Any:
        try:
            return ray.get(getattr(self._store(), method).remote(*args), timeout=timeout)
        except ray.exceptions.RayError as error:
            self._failed(error)
            return None

    def _store(self) -> ActorHandle:
        with self._lock:
            if self._handle is None:
                self._handle = get_store(self._budget_bytes, self._store_name)
            return self._handle

    def _failed(self, error: ray.exceptions.RayError) -> None:
        with self._lock:
            self._failed_calls += 1
            if isinstance(error, ray.exceptions.RayActorError):
                self._handle = None  # find the store again by name (restarted, or created anew)
        logger.debug("KV tier call failed: %r", error)
