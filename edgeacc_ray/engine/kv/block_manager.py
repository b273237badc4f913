"""KV page allocation: ref-counted pages, a prefix cache keyed by a hash chain, LRU eviction.

A full page's key is hash(parent page's key, the page's token ids), so equal prefixes give equal
keys in every process (`edgeacc_ray.prefix_keys`). Pages no sequence references stay cached under their key
until a new allocation needs them; the least recently released goes first. With the offload tier
(engine/kv/tier.py) the block manager also lists cached pages when a new sequence's prefix match reuses them
(`take_reused_pages`, at their second use: a page read once is never worth sending), and takes in
pages the tier brought back (`attach`).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from edgeacc_ray.engine.request import Sequence
from edgeacc_ray.prefix_keys import full_page_keys


@dataclass
class ReusedPages:
    """Consecutive pages of one chain reused for the first time: keys[0]'s parent is `parent`."""

    parent: bytes
    keys: list[bytes]
    pages: list[int]


class BlockManager:
    def __init__(
        self,
        num_pages: int,
        page_size: int,
        enable_prefix_caching: bool = True,
        record_reused_pages: bool = False,
    ) -> None:
        """`record_reused_pages`: list cached pages at their first reuse for `take_reused_pages`."""
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.reused_pages: list[ReusedPages] | None = [] if record_reused_pages else None
        self.listed = [
            False
        ] * num_pages  # listed for the tier (or came from it) in this stay under its key
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
        """Give a new sequence the cached pages of its longest cached prefix (never its last token, nor
        positions it needs computed for prompt logprobs: `seq.num_cacheable_tokens`)."""
        if not self.enable_prefix_caching:
            return
        size = self.page_size
        run: ReusedPages | None = None
        for key in full_page_keys(seq.token_ids, size, 0, seq.num_cacheable_tokens // size):
            page = self.page_of_key.get(key)
            if page is None:
                break
            self._acquire(page)
            parent = seq.last_page_key
            seq.page_table.append(page)
            seq.page_keys.append(key)
            if self.reused_pages is None or self.listed[page]:
                run = None
                continue
            self.listed[page] = True
            if run is None:
                run = ReusedPages(parent, [], [])
                self.reused_pages.append(run)
            run.keys.append(key)
            run.pages.append(page)
        seq.num_computed_tokens = len(seq.page_table) * size
        if (
            seq.num_output_tokens == 0
        ):  # a preempted sequence keeps the count of its first admission
            seq.num_cached_tokens = seq.num_computed_tokens
            seq.num_host_cached_tokens = 0

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
        start, end = len(seq.page_keys), seq.num_computed_tokens // size
        for index, key in enumerate(
            full_page_keys(seq.token_ids, size, start, end, seq.last_page_key), start
        ):
            seq.page_keys.append(key)
            page = seq.page_table[index]
            if key in self.page_of_key or self.key_of_page[page] is not None:
                continue  # computed twice (another sequence keyed it first)
            self.page_of_key[key] = page
            self.key_of_page[page] = key

    def take_reused_pages(self) -> list[ReusedPages]:
        """The pages `match_prefix` reused for the first time since the last call, a parent before its
        children. Their sequences hold them, so their KV stays put until the caller reads it."""
        if not self.reused_pages:  # none since the last call, or not recording
            return []
        runs, self.reused_pages = self.reused_pages, []
        return runs

    def attach(self, seq: Sequence, keys: list[bytes]) -> list[tuple[int, int]]:
        """Extend seq's cached prefix (its page table holds only keyed pages) by the pages of `keys`,
        which continue its chain: a key cached here shares its page, any other gets a fresh page
        keyed as if computed, until the pool runs out. Returns (index in keys, page) of the fresh
        pages, whose KV the caller must write before they are read."""
        fresh: list[tuple[int, int]] = []
        for index, key in enumerate(keys):
            page = self.page_of_key.get(key)
            if page is not None:
                self._acquire(page)
            elif self.num_free_pages == 0:
                break
            else:
                page = self._take_page()
                self.page_of_key[key] = page
                self.key_of_page[page] = key
                self.listed[page] = True  # the tier has it: never sent back
                fresh.append((index, page))
            seq.page_table.append(page)
            seq.page_keys.append(key)
        seq.num_computed_tokens = len(seq.page_table) * self.page_size
        return fresh

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
        self.listed[page] = False
        return page
