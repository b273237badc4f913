"""The tier's bookkeeping without Ray: chain-end LRU eviction, byte budget, packed objects."""

from __future__ import annotations

import random

from kv_store.chain_index import ChainIndex
from kv_store.messages import ROOT, ChainSegment

NS = b"ns000000"
PAGE = 100  # bytes per page


def chain(name: str, n: int) -> list[bytes]:
    return [f"{name}{i}".encode() for i in range(n)]


def put(index: ChainIndex, parent: bytes, keys: list[bytes], made: list[list[int]] | None = None):
    def make_object(indices: list[int]) -> str:
        if made is not None:
            made.append(indices)
        return f"object-{len(indices)}"

    return index.insert(NS, [ChainSegment(parent, tuple(keys))], PAGE, [0] * len(keys), make_object)


def cached(index: ChainIndex, keys: list[bytes]) -> list[bool]:
    return [NS + key in index._pages for key in keys]


def assert_no_holes(index: ChainIndex) -> None:
    for page in index._pages.values():
        assert page.parent is None or page.parent in index._pages
    assert index.bytes_held <= index.budget_bytes


def test_match_and_locate_count_the_leading_run():
    index = ChainIndex(budget_bytes=10_000)
    a = chain("a", 5)
    assert put(index, ROOT, a).stored == 5
    assert index.match(NS, a + [b"x"]) == 5
    assert index.match(NS, [b"x"] + a) == 0
    located = index.locate(NS, a[:3] + [b"x", a[4]])
    assert [loc.offset for loc in located] == [0, PAGE, 2 * PAGE]
    assert (index.hits, index.misses) == (3, 2)
    assert index.match(b"other-ns", a) == 0


def test_eviction_takes_the_least_recent_chain_end_and_leaves_no_hole():
    index = ChainIndex(budget_bytes=10 * PAGE)
    a, b = chain("a", 6), chain("b", 4)
    for i, key in enumerate(a):  # one page per object, so each eviction frees bytes
        put(index, ROOT if i == 0 else a[i - 1], [key])
    for i, key in enumerate(b):
        put(index, ROOT if i == 0 else b[i - 1], [key])
    index.match(NS, a)  # a is now more recent than b
    c = chain("c", 3)
    for i, key in enumerate(c):
        put(index, ROOT if i == 0 else c[i - 1], [key])
    assert cached(index, a) == [True] * 6
    assert cached(index, b) == [True, False, False, False]  # b lost its end, never its start
    assert index.evictions == 3
    assert_no_holes(index)


def test_a_packed_object_frees_its_bytes_with_its_last_page():
    index = ChainIndex(budget_bytes=8 * PAGE)
    a = chain("a", 4)
    put(index, ROOT, a)  # one object of 4 pages
    assert (index.bytes_held, index.stats().objects) == (4 * PAGE, 1)
    b = chain("b", 6)
    put(index, ROOT, b[:1])
    put(index, b[0], b[1:2])
    index.match(NS, b[:2])
    result = put(
        index, b[1], b[2:6]
    )  # needs 2 more pages of room: a goes page by page, then its object
    assert result.stored == 4
    assert cached(index, a) == [False] * 4
    assert index.evictions == 4
    assert index.bytes_held == 6 * PAGE
    assert_no_holes(index)


def test_pages_without_their_parent_or_beyond_the_budget_are_rejected():
    index = ChainIndex(budget_bytes=4 * PAGE)
    assert put(index, b"unknown-parent", chain("a", 2)).rejected == 2
    made: list[list[int]] = []
    assert put(index, ROOT, chain("big", 5), made).rejected == 5
    assert made == [] and index.bytes_held == 0
    a = chain("a", 4)
    put(index, ROOT, a)
    # the chain's end is the new page's parent: it cannot make room for its own child
    assert put(index, a[-1], [b"a4"]).rejected == 1
    assert cached(index, a) == [True] * 4


def test_pages_already_held_are_not_stored_twice():
    index = ChainIndex(budget_bytes=10 * PAGE)
    a = chain("a", 5)
    put(index, ROOT, a[:3])
    made: list[list[int]] = []
    result = put(index, ROOT, a, made)
    assert (result.stored, result.present, result.rejected) == (2, 3, 0)
    assert made == [[3, 4]]  # only the new pages' bytes go into the new object
    assert index.bytes_held == 5 * PAGE


def test_random_trees_under_pressure_keep_every_chain_whole_and_the_budget():
    rng = random.Random(7)
    index = ChainIndex(budget_bytes=40 * PAGE)
    chains: list[list[bytes]] = []
    for step in range(400):
        if chains and rng.random() < 0.5:  # extend or branch off a known chain
            base = rng.choice(chains)
            cut = rng.randrange(len(base) + 1)
            keys = base[:cut] + chain(f"s{step}-", rng.randint(1, 6))
        else:
            keys = chain(f"s{step}-", rng.randint(1, 8))
        chains.append(keys)
        start = rng.randrange(len(keys))
        put(index, ROOT if start == 0 else keys[start - 1], keys[start:])
        index.match(NS, rng.choice(chains))
        assert_no_holes(index)
    assert index.evictions > 0
