"""What crosses from rank 0 to the other tensor-parallel ranks: once, what a rank needs to start
(`WorkerSpec`, through Ray); every step, the forward's inputs (`StepInputs`, over the process group).

Under tensor parallelism the decode workspace is off (its rows are rank 0's bookkeeping), so
attention needs only the new tokens' pool slots, the decode rows' page tables and lengths, and the
prefill chunks: all integers, packed into one int64 tensor for a single broadcast.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from edgeacc_ray.models.attention import AttentionMetadata, PrefillChunk


class StepKind(enum.IntEnum):
    """The header of every message on the group: what follows, and whether a payload does."""

    STEP = 1  # a payload of StepInputs follows; every rank runs the forward
    HEARTBEAT = 2  # rank 0 is alive and idle (keeps the other ranks' bounded waits from expiring)
    STOP = 3  # leave the loop; the group is being closed


@dataclass(frozen=True)
class WorkerSpec:
    """Everything rank `rank` (> 0) needs to load its shard, size its pool and join the group."""

    model_path: str
    dtype: str
    device: str  # "cpu" or "cuda"
    num_threads: int
    num_pages: int
    page_size: int
    rank: int
    world_size: int
    store_host: str  # the rendezvous (rank 0's TCPStore)
    store_port: int
    group_name: str  # prefix of this group's keys in the store
    timeout_s: float  # every collective fails after this long instead of hanging


@dataclass(frozen=True)
class RankInfo:
    """What a loaded rank reports back: where it runs (for the logs and the peer-access report)."""

    rank: int
    pid: int
    node_ip: str
    gpu_ids: tuple[int, ...]  # physical ids Ray gave it; empty on the CPU


@dataclass(frozen=True)
class PrefillRows:
    """One prefill chunk's place in the batch (AttentionMetadata's PrefillChunk, without tensors)."""

    start: int
    num_tokens: int
    context_len: int
    num_pages: int  # how many of the step's prefill page ids are this chunk's


@dataclass(frozen=True)
class StepInputs:
    """One forward's inputs: T new tokens, B decode rows (first), then the prefill chunks."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] pool slot of every new token
    decode_page_table: torch.Tensor  # [B, max_pages], padded with page 0
    decode_lengths: torch.Tensor  # [B] context length of each decode row (incl. its new token)
    prefills: tuple[PrefillRows, ...]
    prefill_page_ids: torch.Tensor  # [sum of num_pages], the chunks' pages in order

    @classmethod
    def from_forward(
        cls, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> "StepInputs":
        """The inputs of the forward rank 0 is about to run (ModelRunner's paged path only)."""
        if meta.num_workspace or meta.workspace is not None:
            raise ValueError("the decode workspace is off under tensor parallelism")
        batch = meta.num_decode
        if batch:
            table = meta.decode_page_table
            lengths = (meta.paged_mask == 0).sum(
                dim=1
            )  # the mask is 0 up to each row's length, -inf after
        else:
            table, lengths = torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        chunks = tuple(
            PrefillRows(c.start, c.num_tokens, c.context_len, len(c.page_ids))
            for c in meta.prefills
        )
        page_ids = (
            torch.cat([c.page_ids.cpu() for c in meta.prefills])
            if meta.prefills
            else torch.zeros(0, dtype=torch.long)
        )
        return cls(input_ids, positions, meta.slot_mapping, table, lengths, chunks, page_ids)

    def pack(self) -> torch.Tensor:
        """One int64 CPU tensor: [T, B, max_pages, C, (start, n, context, pages) x C, arrays...]."""
        batch, width = self.decode_page_table.shape
        head = [len(self.input_ids), batch, width, len(self.prefills)]
        for c in self.prefills:
            head += [c.start, c.num_tokens, c.context_len, c.num_pages]
        arrays = [
            self.input_ids,
            self.positions,
            self.slot_mapping,
            self.decode_page_table.reshape(-1),
            self.decode_lengths,
            self.prefill_page_ids,
        ]
        return torch.cat([torch.tensor(head, dtype=torch.long)] + [a.cpu().long() for a in arrays])

    @classmethod
    def unpack(cls, flat: torch.Tensor) -> "StepInputs":
        tokens, batch, width, num_chunks = flat[:4].tolist()
        rows = flat[4 : 4 + 4 * num_chunks].view(-1, 4).tolist()
        chunks = tuple(PrefillRows(*row) for row in rows)
        sizes = [tokens, tokens, tokens, batch * width, batch, sum(c.num_pages for c in chunks)]
        ids, positions, slots, table, lengths, page_ids = flat[4 + 4 * num_chunks :].split(sizes)
        return cls(ids, positions, slots, table.view(batch, width), lengths, chunks, page_ids)

    def metadata(self, device: torch.device | str, page_size: int) -> AttentionMetadata:
        """The AttentionMetadata rank 0 built for this step, rebuilt here (same values)."""
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping.to(device),
            num_decode=len(self.decode_lengths),
            decode_mask=None,
            prefills=[],
        )
        pages = self.prefill_page_ids.split([c.num_pages for c in self.prefills])
        meta.prefills = [
            PrefillChunk(c.start, c.num_tokens, c.context_len, p.to(device))
            for c, p in zip(self.prefills, pages)
        ]
        if meta.num_decode:
            span = self.decode_page_table.shape[1] * page_size
            visible = torch.arange(span)[None, :] < self.decode_lengths[:, None]
            meta.decode_page_table = self.decode_page_table.to(device)
            meta.paged_mask = torch.where(visible, 0.0, float("-inf")).to(torch.float32).to(device)
        return meta
