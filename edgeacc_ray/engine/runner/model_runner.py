"""Owns the model and the KV page pool; turns a scheduled batch into tensors and runs one forward."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from edgeacc_ray.engine.hardware import CudaRunnerOptions
from edgeacc_ray.engine.request import Sequence
from edgeacc_ray.engine.runner.cuda_graphs import DecodeGraphs
from edgeacc_ray.engine.runner.decode_workspace import DecodeWorkspace
from edgeacc_ray.engine.sampling import prompt_logprobs
from edgeacc_ray.engine.scheduling import ScheduledBatch
from edgeacc_ray.models.attention import AttentionMetadata, PrefillChunk
from edgeacc_ray.models.config import ModelArgs
from edgeacc_ray.models.qwen3 import CausalLM

if TYPE_CHECKING:
    from edgeacc_ray.models.attention_flashinfer import FlashInferAttention


def kv_page_bytes(args: ModelArgs, page_size: int, dtype: torch.dtype) -> int:
    """Bytes one page takes across all layers (keys and values)."""
    element = torch.empty((), dtype=dtype).element_size()
    return args.num_layers * 2 * args.num_kv_heads * page_size * args.head_dim * element


LONG_ROW_MIN = 256  # contexts up to this length always attend in the workspace


def kv_pool_shape(args: ModelArgs, num_pages: int, page_size: int) -> tuple[int, ...]:
    return (args.num_layers, 2, args.num_kv_heads, num_pages, page_size, args.head_dim)


class ModelRunner:
    """`kv_cache` is the pool [layers, 2, Hkv, num_pages, page_size, D]; None allocates a private one
    (Semi-PD passes the shared pool instead)."""

    def __init__(
        self,
        model: CausalLM,
        args: ModelArgs,
        num_pages: int,
        page_size: int,
        workspace_bytes: int = 0,
        kv_cache: torch.Tensor | None = None,
        cuda: CudaRunnerOptions | None = None,
    ) -> None:
        """`cuda` turns on flashinfer and/or decode CUDA graphs (engine/hardware/device.py); graphs need a
        scratch page past `num_pages`, which a private pool gets here and a shared one must bring."""
        self.model = model
        self.args = args
        self.page_size = page_size
        self.device = model.model.embed_tokens.weight.device
        self.dtype = model.model.embed_tokens.weight.dtype
        if kv_cache is None:
            # empty + zero_ touches every page now; a lazily zeroed pool page-faults on each first write
            scratch = 1 if cuda is not None and cuda.cuda_graphs else 0
            kv_cache = torch.empty(
                kv_pool_shape(args, num_pages + scratch, page_size),
                dtype=self.dtype,
                device=self.device,
            ).zero_()
        self.kv_cache = kv_cache
        self.kv_caches = list(self.kv_cache.unbind(0))
        self.workspace = (
            DecodeWorkspace(self.kv_cache, workspace_bytes) if workspace_bytes else None
        )
        self.graphs: DecodeGraphs | None = None
        self.flashinfer: FlashInferAttention | None = None
        if cuda is not None:
            self._setup_cuda(cuda, num_pages)

    def _setup_cuda(self, cuda: CudaRunnerOptions, num_pages: int) -> None:
        a = self.args
        if cuda.attention == "flashinfer":
            from edgeacc_ray.models.attention_flashinfer import FlashInferAttention

            self.flashinfer = FlashInferAttention(
                a.num_heads, a.num_kv_heads, a.head_dim, self.page_size, self.dtype, self.device
            )
        if cuda.cuda_graphs and self.kv_cache.shape[3] > num_pages:
            self.graphs = DecodeGraphs(
                self.model,
                self.kv_caches,
                self.page_size,
                scratch_page=num_pages,
                max_num_seqs=cuda.max_num_seqs,
                max_pages=-(-cuda.max_model_len // self.page_size),
                capture=self.device.type == "cuda",
            )

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Sequence]]:
        """Compute KV for every scheduled token; return logits [S, vocab] for the S sequences
        whose last token was computed (those that sample), and the sequences themselves. The prompt
        positions of sequences that ask for prompt logprobs are scored into seq.prompt_logprobs."""
        wants_prompt_logprobs = any(
            seq.params.prompt_logprobs is not None and seq.next_prompt_logprob is not None
            for seq, _ in batch.items
        )
        if self.graphs is not None and not wants_prompt_logprobs and self.graphs.accepts(batch):
            seqs = [seq for seq, _ in batch.items]
            logits = self.graphs.run(seqs)
            if logits is not None:  # None: the capture failed; this step (and the next) run eagerly
                return logits.cpu(), seqs
        batch, num_short = self._long_rows_last(batch)
        input_ids, positions, meta, sample_rows, samplers = self._prepare(batch, num_short)
        if self.flashinfer is not None:
            meta.kernel = self.flashinfer.plan(batch.items, self.args.head_dim**-0.5)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        if wants_prompt_logprobs:
            prompt_logprobs.record(self._prompt_rows(batch), hidden, self.model.logits)
        if not samplers:
            return torch.empty(0, self.args.vocab_size), []
        rows = hidden[sample_rows] if len(sample_rows) < hidden.shape[0] else hidden
        return self.model.logits(rows).cpu(), samplers

    @staticmethod
    def _prompt_rows(batch: ScheduledBatch) -> list[prompt_logprobs.PromptRows]:
        """The hidden rows to score for prompt logprobs (rows follow batch.items, as _prepare lays them)."""
        rows, row = [], 0
        for seq, n in batch.items:
            part = prompt_logprobs.rows_to_score(seq, seq.num_computed_tokens, n, row)
            if part is not None:
                rows.append(part)
            row += n
        return rows

    def _long_rows_last(self, batch: ScheduledBatch) -> tuple[ScheduledBatch, int]:
        """Order the decode rows short first; the rows over twice the median context (and over
        LONG_ROW_MIN) attend from pages, so they do not set the length every workspace row is read at
        (a few long rows doubled the decode step: 31 -> 62 ms at batch 64, measured).
        Returns the reordered batch and how many decode rows attend in the workspace."""
        if self.workspace is None or batch.num_decode < 2:
            return batch, batch.num_decode
        decodes = batch.items[: batch.num_decode]
        lengths = sorted(seq.num_computed_tokens + 1 for seq, _ in decodes)
        limit = max(LONG_ROW_MIN, 2 * lengths[len(lengths) // 2])
        short = [item for item in decodes if item[0].num_computed_tokens + 1 <= limit]
        if len(short) == len(decodes):
            return batch, len(short)
        long = [item for item in decodes if item[0].num_computed_tokens + 1 > limit]
        return ScheduledBatch(
            short + long + batch.items[batch.num_decode :], batch.num_decode, batch.prefills
        ), len(short)

    def _prepare(self, batch: ScheduledBatch, num_short: int):
        size = self.page_size
        ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        sample_rows: list[int] = []
        samplers: list[Sequence] = []
        prefills: list[PrefillChunk] = []
        for index, (seq, n) in enumerate(batch.items):
            start = seq.num_computed_tokens
            row = len(ids)
            ids.extend(seq.token_ids[start : start + n])
            pos = np.arange(start, start + n)
            table = np.asarray(seq.page_table)
            positions.append(pos)
            slots.append(table[pos // size] * size + pos % size)
            if index >= batch.num_decode:
                pages = torch.from_numpy(table[: -(-(start + n) // size)]).to(self.device)
                prefills.append(PrefillChunk(row, n, start + n, pages))
            if start + n == seq.num_tokens:
                sample_rows.append(row + n - 1)
                samplers.append(seq)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slots)).to(dev),
            num_decode=batch.num_decode,
            decode_mask=None,
            prefills=prefills,
        )
        if batch.num_decode:
            decodes = [
                seq for seq, _ in batch.items[: batch.num_decode]
            ]  # workspace rows first (run())
            short = decodes[:num_short] if self.workspace is not None else []
            rows = self.workspace.prepare(short) if short else None
            if rows is not None:
                self._workspace_tables(meta, short, rows)
                meta.num_workspace = len(short)
            paged = decodes[meta.num_workspace :]
            if paged:
                meta.decode_page_table, meta.paged_mask = self._decode_tables(paged)
        return (
            torch.tensor(ids, dtype=torch.long, device=dev),
            torch.from_numpy(np.concatenate(positions)).to(dev),
            meta,
            sample_rows,
            samplers,
        )

    def _decode_tables(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """Page table padded with page 0, and a mask that hides the padding, for the decode rows."""
        lengths = np.array([seq.num_computed_tokens + 1 for seq in seqs])
        max_pages = int(-(-lengths.max() // self.page_size))
        table = np.zeros((len(seqs), max_pages), dtype=np.int64)
        for row, seq in enumerate(seqs):
            pages = seq.page_table[:max_pages]
            table[row, : len(pages)] = pages
        return torch.from_numpy(table).to(self.device), self._mask(
            lengths, max_pages * self.page_size
        )

    def _workspace_tables(
        self, meta: AttentionMetadata, seqs: list[Sequence], rows: list[int]
    ) -> None:
        """Where each decode token goes in the workspace, and the mask over the rows in use
        (free rows between them get length 1, so their softmax stays finite; their output is dropped)."""
        buffer = self.workspace.buffer
        num_rows, kv_heads, capacity = (
            self.workspace.rows_in_use(),
            buffer.shape[3],
            buffer.shape[4],
        )
        positions = np.array([seq.num_computed_tokens for seq in seqs])
        row_ids = np.asarray(rows)
        slots = (row_ids[:, None] * kv_heads + np.arange(kv_heads)[None, :]) * capacity + positions[
            :, None
        ]
        lengths = np.ones(num_rows, dtype=np.int64)
        lengths[row_ids] = positions + 1
        meta.workspace = buffer
        meta.workspace_slots = torch.from_numpy(slots.reshape(-1)).to(self.device)
        identity = num_rows == len(rows) and rows == list(range(num_rows))
        meta.workspace_rows = None if identity else torch.from_numpy(row_ids).to(self.device)
        meta.decode_mask = self._mask(lengths, capacity)

    def _mask(self, lengths: np.ndarray, span: int) -> torch.Tensor:
        mask = np.where(np.arange(span)[None, :] < lengths[:, None], 0.0, -np.inf).astype(
            np.float32
        )
        return torch.from_numpy(mask).to(self.device)
