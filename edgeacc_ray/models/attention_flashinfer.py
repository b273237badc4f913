"""Paged attention through flashinfer's batch kernels on CUDA (when flashinfer imports).

The pool keeps its own layout, [layers, 2, Hkv, num_pages, page_size, D]: per layer, keys and values
are each [Hkv, num_pages, page_size, D], which transposed is flashinfer's HND layout
[num_pages, Hkv, page_size, D] as a strided view (no copy; flashinfer reads the page and head strides
from the tensors). New keys/values are written into their slots by attention.py as on every path.

One plan per step, shared by every layer: a step of decode rows only uses the decode wrapper; any
step with prompt rows uses the prefill wrapper for all rows (a decode row is a query of length 1, and
flashinfer's causal mask aligns each row's queries to the end of its context, as our prefill chunks
need). `paged_layout` builds the CSR page lists from the batch and is plain Python, tested on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

WORKSPACE_BYTES = 128 * 2**20  # flashinfer's scratch for split-KV partial results


@dataclass(frozen=True)
class PagedLayout:
    """A step's rows in flashinfer's CSR form: queries per row, pages per row, last page fill."""

    qo_indptr: np.ndarray  # [rows + 1] query tokens of row i are qo_indptr[i]:qo_indptr[i + 1]
    kv_indptr: np.ndarray  # [rows + 1] pages of row i are kv_indices[kv_indptr[i]:kv_indptr[i + 1]]
    kv_indices: np.ndarray  # [total pages]
    last_page_len: np.ndarray  # [rows] tokens in each row's last page (1..page_size)

    @property
    def decode_only(self) -> bool:
        return bool((np.diff(self.qo_indptr) == 1).all())


def paged_layout(items: list[tuple[object, int]], page_size: int) -> PagedLayout:
    """From a scheduled batch's (sequence, new tokens) rows: row i attends to the first
    num_computed_tokens + n tokens of its sequence, held in the first pages of its page table."""
    qo, kv, indices, last = [0], [0], [], []
    for seq, n in items:
        context = seq.num_computed_tokens + n
        num_pages = -(-context // page_size)
        indices.extend(seq.page_table[:num_pages])
        qo.append(qo[-1] + n)
        kv.append(kv[-1] + num_pages)
        last.append(context - (num_pages - 1) * page_size)
    return PagedLayout(
        np.asarray(qo, dtype=np.int32),
        np.asarray(kv, dtype=np.int32),
        np.asarray(indices, dtype=np.int32),
        np.asarray(last, dtype=np.int32),
    )


class FlashInferAttention:
    """The wrappers and workspace of one model runner (the flashinfer import happens here, on CUDA only)."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        import flashinfer

        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.page_size, self.dtype, self.device = page_size, dtype, device
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, kv_layout="HND"
        )
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, kv_layout="HND")

    def plan(self, items: list[tuple[object, int]], scale: float) -> "FlashInferStep":
        layout = paged_layout(items, self.page_size)
        dev = self.device

        def on_device(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(dev)

        kv_indptr, kv_indices, last = (
            on_device(layout.kv_indptr),
            on_device(layout.kv_indices),
            on_device(layout.last_page_len),
        )
        if layout.decode_only:
            self.decode.plan(
                kv_indptr,
                kv_indices,
                last,
                self.num_heads,
                self.num_kv_heads,
                self.head_dim,
                self.page_size,
                pos_encoding_mode="NONE",
                sm_scale=scale,
                q_data_type=self.dtype,
                kv_data_type=self.dtype,
            )
            return FlashInferStep(self.decode)
        self.prefill.plan(
            on_device(layout.qo_indptr),
            kv_indptr,
            kv_indices,
            last,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.page_size,
            causal=True,
            sm_scale=scale,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
        )
        return FlashInferStep(self.prefill)


@dataclass
class FlashInferStep:
    """One step's planned wrapper; `attend` runs it for one layer."""

    wrapper: object

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        """q [T, H, D] (unscaled: the plan holds sm_scale) over the layer's pool
        [2, Hkv, num_pages, page_size, D]; returns [T, H * D]."""
        keys, values = kv_cache[0].transpose(0, 1), kv_cache[1].transpose(0, 1)  # HND views
        out = self.wrapper.run(q.contiguous(), (keys, values))
        return out.reshape(out.shape[0], -1)
