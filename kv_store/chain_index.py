"""The store's bookkeeping: pages keyed by a hash chain, packed in objects, within a byte budget.

Only a chain's end (a page no cached page names as parent) can be evicted, least recently used
first, so a cached chain never has a hole: whatever prefix of a chain is cached is usable. Pages
share packed objects, so the bytes held are those of live objects, and an object's bytes go only
when its last page goes. Plain Python, no Ray: the store actor wraps it around object refs.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from kv_store.messages import ROOT, ChainSegment, PutResult, StoreStats

H = TypeVar("H")  # what holds an object's bytes (an ObjectRef in the store actor)


@dataclass
class _Page:
    parent: bytes | None  # None: the page starts a chain
    object_id: int
    offset: int
    nbytes: int
    checksum: int
    tick: int
    children: int = 0


@dataclass
class _Object(Generic[H]):
    handle: H
    nbytes: int
    live_pages: int


@dataclass
class _Plan:
    new: list[tuple[bytes, bytes | None, int]] = field(
        default_factory=list
    )  # (key, parent, batch index)
    links: set[bytes] = field(default_factory=set)  # cached pages the new ones hang from
    present: int = 0
    rejected: int = 0


@dataclass(frozen=True)
class Located(Generic[H]):
    handle: H
    offset: int
    nbytes: int
    checksum: int


class ChainIndex(Generic[H]):
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.bytes_held = 0
        self.hits = self.misses = self.stored = self.rejected = self.evictions = 0
        self._pages: dict[bytes, _Page] = {}  # namespace + page key -> page
        self._objects: dict[int, _Object[H]] = {}
        self._leaves: list[
            tuple[int, bytes]
        ] = []  # heap of (tick, key); stale entries skipped on pop
        self._clock = 0
        self._next_object_id = 0

    def insert(
        self,
        namespace: bytes,
        segments: Sequence[ChainSegment],
        page_nbytes: int,
        checksums: Sequence[int],
        make_object: Callable[[list[int]], H],
    ) -> PutResult:
        """Add the batch's pages that are new and hang from a cached page (or start a chain), in one
        object: `make_object(batch_indices)` stores those pages' bytes, in that order, and returns
        the object's handle. Evicts chain ends to fit; never exceeds the budget."""
        plan = self._plan(namespace, segments)
        nbytes = len(plan.new) * page_nbytes
        if plan.new and not self._make_room(nbytes, protect=plan.links):
            plan.rejected += len(plan.new)
            plan.new.clear()
        if plan.new:
            self._add(
                make_object([index for _, _, index in plan.new]),
                nbytes,
                plan,
                page_nbytes,
                checksums,
            )
        self.rejected += plan.rejected
        return PutResult(stored=len(plan.new), present=plan.present, rejected=plan.rejected)

    def match(self, namespace: bytes, keys: Sequence[bytes]) -> int:
        """How many leading keys are cached (they stay cached longer: a hit refreshes recency)."""
        hits = 0
        for key in keys:
            page = self._pages.get(namespace + key)
            if page is None:
                break
            self._touch(namespace + key, page)
            hits += 1
        return hits

    def locate(self, namespace: bytes, keys: Sequence[bytes]) -> list[Located[H]]:
        """Where the leading cached keys' bytes are; counts them as hits, the rest as misses."""
        found = []
        for key in keys[: self.match(namespace, keys)]:
            page = self._pages[namespace + key]
            found.append(
                Located(
                    self._objects[page.object_id].handle, page.offset, page.nbytes, page.checksum
                )
            )
        self.hits += len(found)
        self.misses += len(keys) - len(found)
        return found

    def stats(self) -> StoreStats:
        return StoreStats(
            hits=self.hits,
            misses=self.misses,
            stored=self.stored,
            rejected=self.rejected,
            evictions=self.evictions,
            pages=len(self._pages),
            objects=len(self._objects),
            bytes_held=self.bytes_held,
            budget_bytes=self.budget_bytes,
        )

    def _plan(self, namespace: bytes, segments: Sequence[ChainSegment]) -> _Plan:
        plan, planned, index = _Plan(), set(), 0
        for segment in segments:
            parent = None if segment.parent == ROOT else namespace + segment.parent
            if parent is not None and parent not in self._pages and parent not in planned:
                plan.rejected += len(segment.keys)  # a page whose parent is gone would be a hole
                index += len(segment.keys)
                continue
            for key in segment.keys:
                full = namespace + key
                if full in self._pages:
                    plan.present += 1
                    plan.links.add(full)
                elif full in planned:
                    plan.present += 1
                else:
                    plan.new.append((full, parent, index))
                    planned.add(full)
                    if parent is not None and parent in self._pages:
                        plan.links.add(parent)
                parent = full
                index += 1
        return plan

    def _make_room(self, nbytes: int, protect: set[bytes]) -> bool:
        if nbytes > self.budget_bytes:
            return False
        spared = []
        while self.bytes_held + nbytes > self.budget_bytes:
            key = self._pop_lru_leaf()
            if key is None:
                break
            if key in protect:
                spared.append(key)
            else:
                self._evict(key)
        for key in spared:
            heapq.heappush(self._leaves, (self._pages[key].tick, key))
        return self.bytes_held + nbytes <= self.budget_bytes

    def _add(
        self, handle: H, nbytes: int, plan: _Plan, page_nbytes: int, checksums: Sequence[int]
    ) -> None:
        object_id = self._next_object_id
        self._next_object_id += 1
        self._objects[object_id] = _Object(handle, nbytes, live_pages=len(plan.new))
        self.bytes_held += nbytes
        for slot, (key, parent, index) in enumerate(plan.new):
            page = _Page(
                parent,
                object_id,
                slot * page_nbytes,
                page_nbytes,
                checksums[index],
                tick=self._tick(),
            )
            self._pages[key] = page
            if parent is not None:
                self._pages[parent].children += 1
            heapq.heappush(self._leaves, (page.tick, key))
        self.stored += len(plan.new)

    def _evict(self, key: bytes) -> None:
        page = self._pages.pop(key)
        self.evictions += 1
        obj = self._objects[page.object_id]
        obj.live_pages -= 1
        if obj.live_pages == 0:
            del self._objects[page.object_id]  # the last reference: the object is freed
            self.bytes_held -= obj.nbytes
        if page.parent is not None:
            parent = self._pages[page.parent]
            parent.children -= 1
            if parent.children == 0:
                heapq.heappush(self._leaves, (parent.tick, page.parent))

    def _touch(self, key: bytes, page: _Page) -> None:
        page.tick = self._tick()
        if page.children == 0:
            heapq.heappush(self._leaves, (page.tick, key))
            if len(self._leaves) > 2 * len(self._pages) + 64:  # drop stale entries now and then
                self._leaves = [(p.tick, k) for k, p in self._pages.items() if p.children == 0]
                heapq.heapify(self._leaves)

    def _pop_lru_leaf(self) -> bytes | None:
        while self._leaves:
            tick, key = heapq.heappop(self._leaves)
            page = self._pages.get(key)
            if page is not None and page.children == 0 and page.tick == tick:
                return key
        return None

    def _tick(self) -> int:
        self._clock += 1
        return self._clock
