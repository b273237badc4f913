"""KV page allocation: ref-counted pages, a prefix cache keyed by a hash chain, LRU eviction.

A full page's key is hash(parent page's key, the page's token ids), so equal prefixes give equal
keys in every process (DESIGN §3). Pages no sequence references stay cached under their key
until a new allocation needs them; the least recently released goes first.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict, deque

import numpy as np

from edgeacc_ray.engine.sequence import Sequence

ROOT_KEY = b""


def page_key(parent: bytes, token_ids: list[int]) -> bytes:
    data = parent + np.asarray(token_ids, dtype=np.int64).tobytes()
    return hashlib.blake2b(data, digest_size=16).digest()


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_pages
        self.key_of_page: list[bytes | None] = [None] * num_pages
        self.page_of_key: dict[bytes, int] = {}
        self.free_pages: deque[int] = deque(range(num_pages))
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first

    @property
    def num_free_pages(self) -> int:
        """Pages an allocation can take now: free ones plus evictable cached ones."""
        return len(self.free_pages) + len(self.evictable)

    @property
    def num_cached_pages(self) -> int:
        return len(self.evictable)

    def pages_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.page_size) - len(seq.page_table))

    def match_prefix(self, seq: Sequence) -> None:
        """Give a new sequence the cached pages of its longest cached prefix (never its last token)."""
        if not self.enable_prefix_caching:
            return
        tokens, size, parent = seq.token_ids, self.page_size, ROOT_KEY
        for start in range(0, seq.num_tokens - 1 - size + 1, size):
            key = page_key(parent, tokens[start:start + size])
            page = self.page_of_key.get(key)
            if page is None:
                break
            self._acquire(page)
            seq.page_table.append(page)
            seq.page_keys.append(key)
            parent = key
        seq.num_computed_tokens = len(seq.page_table) * size
        if seq.num_output_tokens == 0:  # a preempted sequence keeps the count of its first admission
            seq.num_cached_tokens = seq.num_computed_tokens

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Extend seq's page table to hold num_tokens tokens; False (and no change) if pages run out."""
        needed = self.pages_needed(seq, num_tokens)
        if needed > self.num_free_pages:
            return False
        for _ in range(needed):
            seq.page_table.append(self._take_page())
        return True

    def commit_full_pages(self, seq: Sequence) -> None:
        """Key every page that is now full of computed tokens, so later requests can reuse it."""
        if not self.enable_prefix_caching:
            return
        size = self.page_size
        while (len(seq.page_keys) + 1) * size <= seq.num_computed_tokens:
            index = len(seq.page_keys)
            parent = seq.page_keys[-1] if seq.page_keys else ROOT_KEY
            key = page_key(parent, seq.token_ids[index * size:(index + 1) * size])
            seq.page_keys.append(key)
            page = seq.page_table[index]
            if key not in self.page_of_key and self.key_of_page[page] is None:
                self.page_of_key[key] = page
                self.key_of_page[page] = key

    def free(self, seq: Sequence) -> None:
        """Release a sequence's pages; keyed ones stay cached (newest last in the LRU order)."""
        for page in reversed(seq.page_table):
            self.ref_count[page] -= 1
            if self.ref_count[page] == 0:
                if self.key_of_page[page] is not None:
                    self.evictable[page] = None
                else:
                    self.free_pages.append(page)
        seq.page_table.clear()
        seq.page_keys.clear()
        seq.num_computed_tokens = 0

    def flush(self) -> None:
        """Drop every unreferenced cached page."""
        while self.evictable:
            self.free_pages.append(self._evict())

    def _acquire(self, page: int) -> None:
        if self.ref_count[page] == 0:
            self.evictable.pop(page, None)
        self.ref_count[page] += 1

    def _take_page(self) -> int:
        page = self.free_pages.popleft() if self.free_pages else self._evict()
        self.ref_count[page] = 1
        return page

    def _evict(self) -> int:
        page, _ = self.evictable.popitem(last=False)
        del self.page_of_key[self.key_of_page[page]]
        self.key_of_page[page] = None
        return page
