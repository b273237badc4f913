"""Attention over a paged KV pool: write the new keys/values into their slots, then attend.

A layer's pool is one tensor [2, num_kv_heads, num_pages, page_size, head_dim] (keys, values).
Decode rows (one query token per sequence) are attended as one padded batch; prefill chunks one
sequence at a time with a causal mask offset by the context already cached.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefillChunk:
    start: int  # first row of this chunk in the flattened batch
    num_tokens: int
    context_len: int  # tokens in KV after this chunk (cached prefix + chunk)
    page_ids: torch.Tensor  # [pages covering context_len]


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] pool slot (page * page_size + offset) of every new token
    num_decode: int  # rows [0, num_decode) are decode tokens, one per sequence
    decode_page_table: torch.Tensor | None  # [num_decode, max_pages], padded with page 0
    decode_mask: torch.Tensor | None  # [num_decode, max_pages * page_size] additive, -inf past the context
    prefills: list[PrefillChunk]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D] for the new tokens; returns [T, H * D]."""
    num_kv_heads, num_pages, page_size, head_dim = kv_cache.shape[1:]
    slots = kv_cache.view(2, num_kv_heads, num_pages * page_size, head_dim)
    slots[0].index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
    slots[1].index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
    pages = kv_cache.view(2, num_kv_heads, num_pages, page_size * head_dim)
    q = q * scale
    outs = []
    if meta.num_decode:
        outs.append(_decode_attention(q[:meta.num_decode], pages, meta, page_size, head_dim))
    for chunk in meta.prefills:
        rows = slice(chunk.start, chunk.start + chunk.num_tokens)
        if chunk.context_len == chunk.num_tokens:  # nothing cached before: attend the fresh k/v
            keys, values = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
        else:
            keys, values = _gather(pages, chunk.page_ids, head_dim, chunk.context_len)
        outs.append(_prefill_attention(q[rows], keys, values))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.reshape(out.shape[0], -1)


def _gather(pages: torch.Tensor, page_ids: torch.Tensor, head_dim: int, length: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [Hkv, length, D] of one sequence, copied out of its pages."""
    kv = pages.index_select(2, page_ids).view(2, pages.shape[1], -1, head_dim)
    return kv[0, :, :length], kv[1, :, :length]


def _decode_attention(q: torch.Tensor, pages: torch.Tensor, meta: AttentionMetadata,
                      page_size: int, head_dim: int) -> torch.Tensor:
    batch, num_heads, _ = q.shape
    num_kv_heads = pages.shape[1]
    table = meta.decode_page_table
    kv = pages.index_select(2, table.flatten()).view(2, num_kv_heads, batch, -1, head_dim)
    qg = q.view(batch, num_kv_heads, -1, head_dim).transpose(0, 1)  # [Hkv, B, G, D]
    scores = torch.matmul(qg, kv[0].transpose(-1, -2)).float() + meta.decode_mask[None, :, None, :]
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = torch.matmul(probs, kv[1])  # [Hkv, B, G, D]
    return out.transpose(0, 1).reshape(batch, num_heads, head_dim)


def _prefill_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """q [n, H, D] are the last n positions of a context of keys/values [Hkv, L, D]."""
    n, num_heads, head_dim = q.shape
    num_kv_heads, length, _ = keys.shape
    qg = q.view(n, num_kv_heads, -1, head_dim).permute(1, 2, 0, 3)  # [Hkv, G, n, D]
    scores = torch.matmul(qg, keys.transpose(-1, -2).unsqueeze(1)).float()  # [Hkv, G, n, L]
    causal = torch.ones(n, length, dtype=torch.bool, device=q.device).tril(length - n)
    scores.masked_fill_(~causal, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = torch.matmul(probs, values.unsqueeze(1))  # [Hkv, G, n, D]
    return out.permute(2, 0, 1, 3).reshape(n, num_heads, head_dim)
