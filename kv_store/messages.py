"""What crosses the process boundary between a tier client and the store actor, one type each."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray

ROOT: bytes = b""
"""The parent of a chain's first page (the engine's `prefix_keys.ROOT_KEY`)."""


@dataclass(frozen=True)
class ChainSegment:
    """Consecutive pages of one chain: keys[i]'s parent is keys[i-1]; keys[0]'s is `parent`."""

    parent: bytes
    keys: tuple[bytes, ...]


@dataclass(frozen=True)
class PutBatch:
    """Pages packed into one buffer, to become one object in the store. The i-th key over all
    segments, in order, is page i: data[i * page_nbytes:(i + 1) * page_nbytes], with CRC-32 checksums[i]."""

    namespace: bytes
    page_nbytes: int
    segments: tuple[ChainSegment, ...]
    checksums: tuple[int, ...]
    data: np.ndarray  # uint8 [num_pages * page_nbytes]

    @property
    def num_pages(self) -> int:
        return sum(len(s.keys) for s in self.segments)


@dataclass(frozen=True)
class PutResult:
    """stored: pages new in the tier; present: pages it held already; rejected: pages dropped (the
    batch was malformed, a page's parent is not in the tier, or the budget cannot fit them)."""

    stored: int
    present: int
    rejected: int


@dataclass(frozen=True)
class PageLocation:
    """Where one page's bytes lie: a slice of an object the store owns (the reader borrows the ref,
    which keeps the object alive while the reader holds it, even if the store evicts the page)."""

    object_ref: ray.ObjectRef
    offset: int
    nbytes: int
    checksum: int


@dataclass(frozen=True)
class StoreStats:
    """Page counts since the store (re)started: hits and misses count pages asked for by `locate`
    (a read; `match` is a peek and counts nothing); bytes_held is what its live objects occupy."""

    hits: int
    misses: int
    stored: int
    rejected: int
    evictions: int
    pages: int
    objects: int
    bytes_held: int
    budget_bytes: int
