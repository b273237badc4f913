"""Continuous batching with chunked prefill: each step packs decode tokens first, then prompt
chunks, under a per-step token budget; new requests enter when the admission policy allows.

With `remote_prefill` (Semi-PD's decode side) prompts are not computed here: an admitted request gets
pages for all of its tokens at once and leaves in `ScheduledBatch.prefills` for the prefill process;
it stays in `prefilling` (never preempted, its pages busy) until `prefill_done` or `finish`."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

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
    prefills: list[Sequence] = field(default_factory=list)  # remote_prefill: to send to the prefill process


class Scheduler:
    def __init__(self, block_manager: BlockManager, admission: AdmissionPolicy, max_num_batched_tokens: int,
                 remote_prefill: bool = False) -> None:
        self.block_manager = block_manager
        self.admission = admission
        self.max_num_batched_tokens = max_num_batched_tokens
        self.remote_prefill = remote_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefilling: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling)

    def schedule(self, prefill_token_budget: int = 0) -> ScheduledBatch:
        """The next step's batch; with remote_prefill, also up to `prefill_token_budget` prompt tokens
        (at least one whole request when the budget is positive) to hand to the prefill process."""
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
        if self.remote_prefill:
            return ScheduledBatch(items=singles + chunks, num_decode=len(singles),
                                  prefills=self._admit_for_prefill(prefill_token_budget))
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

    def _admit_for_prefill(self, budget: int) -> list[Sequence]:
        admitted: list[Sequence] = []
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if not seq.page_table:
                self.block_manager.match_prefix(seq)
            n = seq.num_uncomputed_tokens
            if admitted and n > budget:
                break
            needed = self.block_manager.pages_needed(seq, seq.num_tokens)
            active = len(self.running) + len(self.prefilling)
            if not self.admission.can_admit(active, self.block_manager.num_free_pages, needed):
                self.block_manager.free(seq)
                break
            self.block_manager.allocate(seq, seq.num_tokens)
            self.waiting.popleft()
            seq.status = SequenceStatus.PREFILLING
            self.prefilling.append(seq)
            admitted.append(seq)
            budget -= n
        return admitted

    def prefill_done(self, seq: Sequence) -> None:
        """The prefill process filled seq's pages: it joins the decode batch."""
        self.prefilling.remove(seq)
        seq.num_computed_tokens = seq.num_tokens
        self.block_manager.commit_full_pages(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

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
        """Drop seq and free its pages. Not for a sequence whose prefill is in flight (its pages are
        being written): the engine finishes it when the prefill returns."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.prefilling:
            self.prefilling.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
