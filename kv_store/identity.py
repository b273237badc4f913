"""What makes two KV pages interchangeable.

Two engines may share a cached page only if they run the same weights, store KV in the same dtype
and layout, and hold the same slice of it (a tensor-parallel rank holds only its own heads). Every
key in the tier is prefixed with the identity's `namespace`, so a page written under one identity
is invisible under any other: a different model or dtype never hits.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class ModelIdentity:
    """`model`: the model's path or name; pass something that changes when the weights change.
    `dtype`: the KV dtype. `page_shape`: one page's KV as the engine hands it over, e.g.
    (layers, 2, kv_heads, page_size, head_dim). `variant`: anything else that changes a page's
    bytes (a parallel rank, a host-memory layout); empty for a single-process engine."""

    model: str
    dtype: torch.dtype
    page_shape: tuple[int, ...]
    variant: str = ""

    def __post_init__(self) -> None:
        if not self.page_shape or min(self.page_shape) <= 0:
            raise ValueError(f"page_shape must be non-empty and positive, got {self.page_shape}")

    @cached_property
    def page_nbytes(self) -> int:
        return math.prod(self.page_shape) * self.dtype.itemsize

    @cached_property
    def namespace(self) -> bytes:
        """8 bytes that prefix every key stored under this identity."""
        text = f"{self.model}\0{self.dtype}\0{self.page_shape}\0{self.variant}"
        return hashlib.blake2b(text.encode(), digest_size=8).digest()
