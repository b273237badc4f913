"""Attention over a paged KV pool: write the new keys/values into their slots, then attend.

A layer's pool is one tensor [2, num_kv_heads, num_pages, page_size, head_dim] (keys, values).
Decode rows (one query token per sequence) are attended as padded batches: in place in a decode
workspace (engine/runner/decode_workspace.py: a contiguous row per sequence), and, for the few rows much
longer than the rest (which would make every workspace row as long as theirs), from pages gathered
on the fly; prefill chunks one sequence at a time with a causal mask offset by the cached context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


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
    decode_mask: (
        torch.Tensor | None
    )  # workspace path: [workspace rows, capacity] additive, -inf past each
    # row's context
    prefills: list[PrefillChunk]
    num_workspace: int = (
        0  # decode rows [0, num_workspace) attend in the workspace, the rest gather pages
    )
    decode_page_table: torch.Tensor | None = (
        None  # pages path: [paged rows, max_pages], padded with page 0
    )
    paged_mask: torch.Tensor | None = (
        None  # pages path: [paged rows, max_pages * page_size] additive
    )
    workspace: torch.Tensor | None = None  # workspace path: [layers, 2, rows, Hkv, length, D]
    workspace_slots: torch.Tensor | None = (
        None  # [num_workspace * Hkv] flat (row, head, position) of new tokens
    )
    workspace_rows: torch.Tensor | None = (
        None  # [num_workspace] row of each query; None if rows == range
    )
    kernel: Any = (
        None  # a planned flashinfer step (models/attention_flashinfer.py): it attends every row
    )


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    workspace: torch.Tensor | None,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D] for the new tokens; returns [T, H * D]."""
    num_kv_heads, num_pages, page_size, head_dim = kv_cache.shape[1:]
    slots = kv_cache.view(2, num_kv_heads, num_pages * page_size, head_dim)
    new_kv = torch.stack((k, v)).transpose(1, 2)  # [2, Hkv, T, D]: keys and values in one write
    slots.index_copy_(2, meta.slot_mapping, new_kv)
    if meta.kernel is not None:
        return meta.kernel.attend(q, kv_cache)
    pages = kv_cache.view(2, num_kv_heads, num_pages, page_size * head_dim)
    q = q * scale
    outs = []
    d, w = meta.num_decode, meta.num_workspace
    if w:
        outs.append(_workspace_attention(q[:w], k[:w], v[:w], workspace, meta))
    if d > w:
        outs.append(_paged_decode_attention(q[w:d], pages, meta, head_dim))
    for chunk in meta.prefills:
        rows = slice(chunk.start, chunk.start + chunk.num_tokens)
        if chunk.context_len == chunk.num_tokens:  # nothing cached before: attend the fresh k/v
            keys, values = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
        else:
            keys, values = _gather(pages, chunk.page_ids, head_dim, chunk.context_len)
        outs.append(_prefill_attention(q[rows], keys, values))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.reshape(out.shape[0], -1)


def _gather(
    pages: torch.Tensor, page_ids: torch.Tensor, head_dim: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [Hkv, length, D] of one sequence, copied out of its pages."""
    kv = pages.index_select(2, page_ids).view(2, pages.shape[1], -1, head_dim)
    return kv[0, :, :length], kv[1, :, :length]


def _workspace_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    workspace: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """Append the new k/v to each sequence's workspace row, then attend rows in place (no gather)."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = workspace.shape[2]
    flat = workspace.view(2, -1, head_dim)
    flat.index_copy_(1, meta.workspace_slots, torch.stack((k, v)).view(2, -1, head_dim))
    rows, length = meta.decode_mask.shape
    qg = q.view(batch, num_kv_heads, -1, head_dim)  # [B, Hkv, G, D]
    if meta.workspace_rows is not None:
        qg = qg.new_zeros((rows,) + qg.shape[1:]).index_copy_(0, meta.workspace_rows, qg)
    keys, values = (
        workspace[0, :rows],
        workspace[1, :rows],
    )  # [R, Hkv, L, D], contiguous: L is the capacity
    scores = torch.matmul(qg, keys.transpose(-1, -2)).float() + meta.decode_mask[:, None, None, :]
    out = torch.matmul(torch.softmax(scores, dim=-1).to(q.dtype), values)  # [R, Hkv, G, D]
    if meta.workspace_rows is not None:
        out = out.index_select(0, meta.workspace_rows)
    return out.reshape(batch, num_heads, head_dim)


def _paged_decode_attention(
    q: torch.Tensor, pages: torch.Tensor, meta: AttentionMetadata, head_dim: int
) -> torch.Tensor:
    batch, num_heads, _ = q.shape
    num_kv_heads = pages.shape[1]
    table = meta.decode_page_table
    kv = pages.index_select(2, table.flatten()).view(2, num_kv_heads, batch, -1, head_dim)
    qg = q.view(batch, num_kv_heads, -1, head_dim).transpose(0, 1)  # [Hkv, B, G, D]
    scores = torch.matmul(qg, kv[0].transpose(-1, -2)).float() + meta.paged_mask[None, :, None, :]
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = torch.matmul(probs, kv[1])  # [Hkv, B, G, D]
    return out.transpose(0, 1).reshape(batch, num_heads, head_dim)


def _prefill_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """q [n, H, D] are the last n positions of a context of keys/values [Hkv, L, D]; q is pre-scaled.
    torch's fused CPU/CUDA kernel beats matmul-softmax-matmul here (2x at 200 tokens, 4x at 2048)."""
    n, num_heads, head_dim = q.shape
    length = keys.shape[1]
    causal = (
        dict(is_causal=True)
        if n == length
        else dict(
            attn_mask=torch.ones(n, length, dtype=torch.bool, device=q.device).tril(length - n)
        )
    )
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), keys, values, scale=1.0, enable_gqa=True, **causal
    )
    return out.transpose(0, 1).reshape(n, num_heads, head_dim)
