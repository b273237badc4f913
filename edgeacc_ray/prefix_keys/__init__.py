"""Prefix keys: every full page of tokens has a key, a hash of (its parent page's key, its token ids),
so equal prefixes give equal keys in every process. The prefix cache, the offload tier and the
cache-aware router all key pages here. Imports no torch, so the router can hash prompts."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import numpy as np

ROOT_KEY = b""  # the parent of a chain's first page


def page_key(parent: bytes, token_ids: Sequence[int]) -> bytes:
    data = parent + np.asarray(token_ids, dtype=np.int64).tobytes()
    return hashlib.blake2b(data, digest_size=16).digest()


def full_page_keys(
    token_ids: Sequence[int], page_size: int, start: int, end: int, parent: bytes = ROOT_KEY
) -> Iterator[bytes]:
    """The keys of pages start..end-1 of `token_ids`, in order, computed as they are asked for;
    `parent` is the key of page start-1 (ROOT_KEY for page 0)."""
    for index in range(start, end):
        parent = page_key(parent, token_ids[index * page_size : (index + 1) * page_size])
        yield parent
