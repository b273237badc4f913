"""A contiguous copy of the decoding sequences' KV, so decode attention reads it in place.

Gathering every sequence's pages out of the pool on every step and every layer costs more than
the attention itself on a CPU (the step is memory-bound). Instead each decoding
sequence keeps a row here for its whole decode life: filled once from its pages when it starts
decoding, then extended by one token per step alongside the pool (the pool stays the source of
truth for the prefix cache and for other processes). Rows freed by finished sequences are reused.
"""

from __future__ import annotations

import torch

from edgeacc_ray.engine.request import Sequence

# Attention reads rows over their whole capacity (a strided slice would make matmul copy it), so
# the capacity grows in small steps: little padding to read, one re-copy every _LENGTH_STEP tokens.
_LENGTH_STEP = 32


class DecodeWorkspace:
    def __init__(self, pool: torch.Tensor, max_bytes: int) -> None:
        self.pool = pool  # [layers, 2, Hkv, num_pages, page_size, D]
        layers, _, kv_heads, _, self.page_size, head_dim = pool.shape
        self.token_bytes = layers * 2 * kv_heads * head_dim * pool.element_size()
        self.max_bytes = max_bytes
        self.buffer = pool.new_empty(
            (layers, 2, 0, kv_heads, 0, head_dim)
        )  # [.., rows, Hkv, length, D]
        self.row_of: dict[Sequence, int] = {}  # keyed by the object, which the dict keeps alive
        self.free_rows: list[int] = []

    def prepare(self, seqs: list[Sequence]) -> list[int] | None:
        """Rows for this step's decoding sequences (in order), filling rows for newcomers.
        None when they do not fit in max_bytes: the caller then attends straight from the pages."""
        live = set(seqs)
        for seq in [s for s in self.row_of if s not in live]:
            self.free_rows.append(self.row_of.pop(seq))
        self.free_rows.sort(reverse=True)  # reuse the lowest free rows first
        next_row = len(self.row_of) + len(self.free_rows)
        newcomers = [s for s in seqs if s not in self.row_of]
        for seq in newcomers:
            if self.free_rows:
                self.row_of[seq] = self.free_rows.pop()
            else:
                self.row_of[seq], next_row = next_row, next_row + 1
        if not self._reserve(next_row, max(s.num_computed_tokens + 1 for s in seqs)):
            self.row_of.clear()
            self.free_rows.clear()
            return None
        for seq in newcomers:
            self._fill(self.row_of[seq], seq)
        return [self.row_of[s] for s in seqs]

    def rows_in_use(self) -> int:
        return max(self.row_of.values(), default=-1) + 1

    def _reserve(self, rows: int, length: int) -> bool:
        """Make the buffer hold rows x length; False if that is over budget. The length also shrinks
        once it is over twice what the live rows need, since attention reads the whole capacity."""
        cur_rows, cur_len = self.buffer.shape[2], self.buffer.shape[4]
        wanted_len = -(-length // _LENGTH_STEP) * _LENGTH_STEP
        if rows <= cur_rows and length <= cur_len <= 2 * wanted_len:
            return True
        new_rows, new_len = (
            max(rows, cur_rows),
            wanted_len if cur_len > 2 * wanted_len else max(cur_len, wanted_len),
        )
        if new_rows * new_len * self.token_bytes > self.max_bytes:
            return False
        layers, _, _, kv_heads, _, head_dim = self.buffer.shape
        grown = self.buffer.new_zeros(  # never garbage: masked positions still pass through matmul
            (layers, 2, new_rows, kv_heads, new_len, head_dim)
        )
        keep = min(cur_len, new_len)
        grown[:, :, :cur_rows, :, :keep] = self.buffer[:, :, :, :, :keep]
        self.buffer = grown
        return True

    def _fill(self, row: int, seq: Sequence) -> None:
        """Copy the KV of the sequence's computed tokens out of its pages into its row."""
        length = seq.num_computed_tokens
        num_pages = -(-length // self.page_size)
        if num_pages == 0:
            return
        pages = torch.tensor(seq.page_table[:num_pages], device=self.pool.device)
        kv = self.pool.index_select(3, pages).flatten(3, 4)[:, :, :, :length]
        self.buffer[:, :, row, :, :length] = kv
