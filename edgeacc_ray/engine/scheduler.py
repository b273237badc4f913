"""Continuous batching with chunked prefill: each step packs decode tokens first, then prompt
chunks, under a per-step token budget; new requests enter when the admission policy allows
(engine/admission.py: their KV reservations fit and the running bound has room). When optimistic
reservations leave a sequence without a page, the newest running sequences are preempted by
recompute (retracted), at most `AdmissionPolicy.max_retractions` per step; a sequence that still
finds no page skips the step.

With `remote_prefill` (Semi-PD's decode side) prompts are not computed here: an admitted request gets
pages for all of its tokens at once and leaves in `ScheduledBatch.prefills` for the prefill process;
it stays in `prefilling` (never preempted, its pages busy) until `prefill_done` or `finish`."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from edgeacc_ray.engine.admission import AdmissionPolicy
from edgeacc_ray.engine.block_manager import BlockManager
from edgeacc_ray.engine.sequence import Sequence, SequenceStatus


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
        self.num_preemptions = 0  # retractions: running sequences sent back to wait
        self.num_admitted = 0  # starts from the waiting queue (a retracted sequence counts again)
        self._retractions_left = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling)

    def schedule(self, prefill_token_budget: int = 0) -> ScheduledBatch:
        """The next step's batch; with remote_prefill, also up to `prefill_token_budget` prompt tokens
        (at least one whole request when the budget is positive) to hand to the prefill process."""
        budget = self.max_num_batched_tokens
        self._retractions_left = self.admission.max_retractions(len(self.running))
        singles: list[tuple[Sequence, int]] = []
        chunks: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING:  # retracted earlier in this loop
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            if not self._allocate_or_retract(seq, n):
                continue
            (singles if n == 1 else chunks).append((seq, n))
            budget -= n
        if self.remote_prefill:
            return ScheduledBatch(items=singles + chunks, num_decode=len(singles),
                                  prefills=self._admit_for_prefill(prefill_token_budget))
        committed = self._committed_if_room()
        while committed is not None and self.waiting and budget > 0:
            seq = self.waiting[0]
            if not seq.page_table:
                self.block_manager.match_prefix(seq)
            if not self._admit(seq, committed):
                break
            n = min(seq.num_uncomputed_tokens, budget)
            self.block_manager.allocate(seq, seq.num_computed_tokens + n)  # within its reservation: fits
            committed += self.admission.pages_to_come(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            (singles if n == 1 else chunks).append((seq, n))
            budget -= n
        return ScheduledBatch(items=singles + chunks, num_decode=len(singles))

    def committed_pages(self) -> int:
        """Pages the admitted sequences are expected to take beyond those they hold."""
        return sum(self.admission.pages_to_come(s) for s in self.running + self.prefilling)

    def _committed_if_room(self) -> int | None:
        """committed_pages() if someone waits and the running bound has room, else None (skip the sum)."""
        if self.waiting and self.admission.has_room(len(self.running) + len(self.prefilling)):
            return self.committed_pages()
        return None

    def _admit(self, seq: Sequence, committed: int) -> bool:
        """Take the head of the queue (its cached prefix pages matched) if the admission policy lets
        it start; otherwise leave it waiting, holding nothing."""
        active = len(self.running) + len(self.prefilling)
        if not self.admission.has_room(active) or not self.admission.fits(committed, seq,
                                                                            self.block_manager.num_free_pages):
            self.block_manager.free(seq)
            return False
        self.waiting.popleft()
        self.num_admitted += 1
        return True

    def _admit_for_prefill(self, budget: int) -> list[Sequence]:
        admitted: list[Sequence] = []
        committed = self._committed_if_room()
        while committed is not None and self.waiting and budget > 0:
            seq = self.waiting[0]
            if not seq.page_table:
                self.block_manager.match_prefix(seq)
            n = seq.num_uncomputed_tokens
            if admitted and n > budget:
                self.block_manager.free(seq)
                break
            if not self._admit(seq, committed):
                break
            self.block_manager.allocate(seq, seq.num_tokens)  # within its reservation: fits
            committed += self.admission.pages_to_come(seq)
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

    def _allocate_or_retract(self, seq: Sequence, n: int) -> bool:
        """Find pages for n more tokens of seq, retracting the newest running sequences while this
        step's allowance lasts. False: seq was retracted, or waits for a page until the next step."""
        while not self.block_manager.allocate(seq, seq.num_computed_tokens + n):
            if self._retractions_left == 0:
                return False
            self._retractions_left -= 1
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
        self.admission.retracted()

    def drop_waiting(self, seqs: list[Sequence]) -> None:
        """Remove these waiting sequences (queue timeouts) in one pass; they hold no pages after."""
        gone = set(seqs)
        self.waiting = deque(s for s in self.waiting if s not in gone)
        for seq in seqs:
            self.block_manager.free(seq)
            seq.status = SequenceStatus.FINISHED

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
