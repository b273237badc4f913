"""CUDA graphs for decode steps on the torch attention path.

A decode step of a small model is hundreds of tiny kernels; on a GPU their launch cost, not the math,
sets the step time. A captured graph replays them in one launch, but only for fixed shapes and fixed
addresses. So every decode batch is padded to a bucket (batch size x pages per row) and its inputs
are copied into that bucket's static buffers before the replay:

- rows past the real batch are padding: they read one scratch slot and write their (discarded) KV
  to a scratch page that no sequence owns (the pool has one page more than the block manager hands
  out);
- each row's page table is padded with the scratch page, and the attention mask (built inside the
  graph from the row lengths) hides everything past a row's context.

A bucket is captured on first use (up to `max_graphs`; beyond that the step runs eagerly), all
sharing one memory pool: replays never overlap and each returns its logits before the next starts.
`capture=False` runs the very same padded forward without a graph, which is how the padding and
bucketing are tested on CPU. The workspace path is CPU-only and flashinfer plans on the host each
step, so graphs cover the paged torch path alone (engine/hardware/device.py decides).
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

import numpy as np
import torch

from edgeacc_ray.engine.request import Sequence
from edgeacc_ray.engine.scheduling import ScheduledBatch
from edgeacc_ray.models.attention import AttentionMetadata
from edgeacc_ray.models.qwen3 import CausalLM

log = logging.getLogger(__name__)

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512)
MAX_GRAPHS = 96


def batch_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """Padded batch sizes: the fixed ladder up to max_num_seqs, and max_num_seqs itself."""
    sizes = [b for b in BATCH_SIZES if b < max_num_seqs]
    return tuple(sizes + [max_num_seqs])


def page_buckets(max_pages: int) -> tuple[int, ...]:
    """Pages per row: powers of two below max_pages, and max_pages (padding costs at most 2x reads)."""
    sizes, p = [], 1
    while p < max_pages:
        sizes.append(p)
        p *= 2
    return tuple(sizes + [max_pages])


def bucket(sizes: tuple[int, ...], n: int) -> int | None:
    """The smallest size >= n, or None when n is past the largest."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


@dataclass
class _Bucket:
    batch: int
    pages: int
    packed: (
        torch.Tensor
    )  # int64 [4 * batch + batch * pages]: ids, positions, slots, lengths, page table
    logits: torch.Tensor | None = None  # the captured output [batch, vocab] float32
    graph: "torch.cuda.CUDAGraph | None" = None


class DecodeGraphs:
    """Decode forwards of `model` over the pool `kv_caches`, padded to buckets and (on CUDA) replayed
    from captured graphs. `scratch_page` must be a page the block manager never hands out."""

    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[torch.Tensor],
        page_size: int,
        scratch_page: int,
        max_num_seqs: int,
        max_pages: int,
        capture: bool = True,
        max_graphs: int = MAX_GRAPHS,
    ) -> None:
        self.model, self.kv_caches, self.page_size = model, kv_caches, page_size
        self.scratch_page = scratch_page
        self.device = kv_caches[0].device
        if capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the pool on a CUDA device, not {self.device}")
        self.batch_sizes, self.page_sizes = batch_buckets(max_num_seqs), page_buckets(max_pages)
        self.capture, self.max_graphs = capture, max_graphs
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        self.arange = torch.arange(max_pages * page_size, device=self.device)
        self._pool = None
        self.replays = 0
        self.eager_fallbacks = 0  # decode batches that fit no bucket or came past max_graphs
        self.failure: str | None = None  # set when a capture failed: graphs are off from then on

    def key(self, seqs: list[Sequence]) -> tuple[int, int] | None:
        """(padded batch, padded pages) for these decode rows, or None if they fit no bucket."""
        batch = bucket(self.batch_sizes, len(seqs))
        longest = max(seq.num_computed_tokens + 1 for seq in seqs)
        pages = bucket(self.page_sizes, -(-longest // self.page_size))
        return None if batch is None or pages is None else (batch, pages)

    def accepts(self, batch: ScheduledBatch) -> bool:
        """Pure decode steps only (one new token per row, no prompt rows), inside the buckets."""
        if self.failure is not None or not batch.items or batch.num_decode != len(batch.items):
            return False
        key = self.key([seq for seq, _ in batch.items])
        if key is None or (key not in self.buckets and len(self.buckets) >= self.max_graphs):
            self.eager_fallbacks += 1
            return False
        return True

    def run(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """Logits [len(seqs), vocab] float32 (on the device) of one decode step of `seqs`; None when
        the bucket's capture failed (logged once; the caller runs the step eagerly, graphs stay off)."""
        key = self.key(seqs)
        if key is None:
            raise ValueError(f"{len(seqs)} decode rows fit no graph bucket")
        b = self.buckets.get(key)
        if b is None:
            try:
                b = self._new_bucket(*key)
            except (
                RuntimeError
            ) as exc:  # an op that cannot be captured, or out of memory while capturing
                self.failure = f"{type(exc).__name__}: {exc}"[:300]
                log.warning(
                    "decode CUDA graph capture failed for bucket %s, graphs off: %s",
                    key,
                    self.failure,
                )
                return None
            self.buckets[key] = b
        b.packed.copy_(torch.from_numpy(self.host_inputs(seqs, b.batch, b.pages)))
        if b.graph is None:
            logits = self._forward(b)
        else:
            b.graph.replay()
            logits = b.logits
        self.replays += 1
        return logits[: len(seqs)]

    def host_inputs(self, seqs: list[Sequence], batch: int, pages: int) -> np.ndarray:
        """The packed inputs of a padded step: real rows first, padding rows on the scratch page."""
        size, scratch = self.page_size, self.scratch_page
        packed = np.zeros(4 * batch + batch * pages, dtype=np.int64)
        ids, positions, slots, lengths = (packed[i * batch : (i + 1) * batch] for i in range(4))
        table = packed[4 * batch :].reshape(batch, pages)
        table[:] = scratch
        slots[:] = scratch * size
        lengths[:] = 1
        for row, seq in enumerate(seqs):
            pos = seq.num_computed_tokens
            ids[row] = seq.token_ids[pos]
            positions[row] = pos
            row_pages = seq.page_table[: pos // size + 1]
            slots[row] = row_pages[-1] * size + pos % size
            lengths[row] = pos + 1
            table[row, : len(row_pages)] = row_pages
        return packed

    def _new_bucket(self, batch: int, pages: int) -> _Bucket:
        packed = torch.from_numpy(self.host_inputs([], batch, pages)).to(self.device)  # all padding
        b = _Bucket(batch, pages, packed)
        if self.capture:
            self._capture(b)
        return b

    def _capture(self, b: _Bucket) -> None:
        """Warm up on a side stream (lazy inits must not land in the graph), then capture."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._forward(b)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA call (not part of the step) must not void the capture
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            b.logits = self._forward(b)
        b.graph = graph

    def _forward(self, b: _Bucket) -> torch.Tensor:
        """The padded decode step, shapes fixed by the bucket: [batch] rows over [batch, pages] tables."""
        n = b.batch
        ids, positions, slots, lengths = (b.packed[i * n : (i + 1) * n] for i in range(4))
        table = b.packed[4 * n :].view(n, b.pages)
        span = b.pages * self.page_size
        mask = torch.zeros((n, span), dtype=torch.float32, device=self.device)
        mask = mask.masked_fill(self.arange[:span][None, :] >= lengths[:, None], float("-inf"))
        meta = AttentionMetadata(
            slot_mapping=slots,
            num_decode=n,
            decode_mask=None,
            prefills=[],
            decode_page_table=table,
            paged_mask=mask,
        )
        hidden = self.model(ids, positions, self.kv_caches, meta)
        return self.model.logits(hidden)
