"""Continuous batching with chunked prefill: each step packs decode tokens first, then prompt
chunks, under a per-step token budget; new requests enter when the admission policy allows."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from edgeacc_ray.engine.block_manager import BlockManager
from edgeacc_ray.engine.sequence import Sequence, SequenceStatus


@dataclass
class AdmissionPolicy:
    """Decides whether one more sequence may start. The dynamic running queue replaces this bound."""

    max_num_seqs: int
    reserve_pages: int  # kept free for the running sequences' next decode pages

    def can_admit(self, num_running: int, free_pages: int, pages_needed: int) -> bool:
        reserve = min(self.reserve_pages, num_running)
        return num_running < self.max_num_seqs and pages_needed + reserve <= free_pages


@dataclass
class ScheduledBatch:
    """Sequences of one step with how many new tokens each computes; one-token rows come first."""

    items: list[tuple[Sequence, int]]
    num_decode: int


class Scheduler:
    def __init__(self, block_manager: BlockManager, admission: AdmissionPolicy, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.admission = admission
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        singles: list[tuple[Sequence, int]] = []
        chunks: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            if not self._allocate_or_preempt(seq, n):
                continue
            (singles if n == 1 else chunks).append((seq, n))
            budget -= n
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if not seq.page_table:
                self.block_manager.match_prefix(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            needed = self.block_manager.pages_needed(seq, seq.num_computed_tokens + n)
            if not self.admission.can_admit(len(self.running), self.block_manager.num_free_pages, needed):
                self.block_manager.free(seq)
                break
            self.block_manager.allocate(seq, seq.num_computed_tokens + n)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            (singles if n == 1 else chunks).append((seq, n))
            budget -= n
        return ScheduledBatch(items=singles + chunks, num_decode=len(singles))

    def _allocate_or_preempt(self, seq: Sequence, n: int) -> bool:
        """Find pages for n more tokens of seq, preempting the newest running sequences if needed."""
        while not self.block_manager.allocate(seq, seq.num_computed_tokens + n):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's pages and queue it first to be recomputed (its prefix may hit the cache)."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
