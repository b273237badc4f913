"""Continuous batching with chunked prefill: each step packs decode tokens first, then prompt
chunks, under a per-step token budget; new requests enter when the admission policy allows
(engine/scheduling/admission.py: their KV reservations fit and the running bound has room). When optimistic
reservations leave a sequence without a page, the newest running sequences are preempted by
recompute (retracted), at most `AdmissionPolicy.max_retractions` per step; a sequence that still
finds no page skips the step.

With `remote_prefill` (Semi-PD's decode side) prompts are not computed here: an admitted request gets
pages for all of its tokens at once and leaves in `ScheduledBatch.prefills` for the prefill process;
it stays in `prefilling` (never preempted, its pages busy) until `prefill_done` or `finish`.

With the KV offload tier (`tier`, engine/kv/tier.py) an admitted sequence whose prompt has
full pages past its device prefix first waits in `loading` while the tier is read (admitted: it
counts toward the running bound and the reservations, holds its device prefix, is never preempted),
and joins the batch, or goes to the prefill process, once the read is back."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from edgeacc_ray.engine.kv import BlockManager
from edgeacc_ray.engine.request import Sequence, SequenceStatus
from edgeacc_ray.engine.scheduling.admission import AdmissionPolicy

if TYPE_CHECKING:
    from edgeacc_ray.engine.kv import KVTier


@dataclass
class ScheduledBatch:
    """Sequences of one step with how many new tokens each computes; one-token rows come first."""

    items: list[tuple[Sequence, int]]
    num_decode: int
    prefills: list[Sequence] = field(
        default_factory=list
    )  # remote_prefill: to send to the prefill process


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        admission: AdmissionPolicy,
        max_num_batched_tokens: int,
        remote_prefill: bool = False,
        tier: KVTier | None = None,
    ) -> None:
        self.block_manager = block_manager
        self.admission = admission
        self.max_num_batched_tokens = max_num_batched_tokens
        self.remote_prefill = remote_prefill
        self.tier = tier
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefilling: list[Sequence] = []
        self.loading: list[
            Sequence
        ] = []  # admitted, reading their prefix from the tier (oldest first)
        self.num_preemptions = 0  # retractions: running sequences sent back to wait
        self.num_admitted = 0  # starts from the waiting queue (a retracted sequence counts again)
        self.blocked = (
            False  # the last schedule() left sequences waiting, and none arrived or left since
        )
        self._retractions_left = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.blocked = False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling or self.loading)

    def loads_pending(self) -> bool:
        """Some sequences are loading and no read has come back: a step would not move them."""
        return bool(self.loading) and not any(self._loaded(seq) for seq in self.loading)

    def schedule(self, prefill_token_budget: int = 0) -> ScheduledBatch:
        """The next step's batch; with remote_prefill, also up to `prefill_token_budget` prompt tokens
        (at least one whole request when the budget is positive) to hand to the prefill process."""
        budget = self.max_num_batched_tokens
        self._retractions_left = self.admission.max_retractions(len(self.running))
        if not self.remote_prefill:
            for (
                seq
            ) in self._loads_done():  # their prefix is in the pool: they compute the rest below
                self.loading.remove(seq)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
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
            return ScheduledBatch(
                items=singles + chunks,
                num_decode=len(singles),
                prefills=self._admit_for_prefill(prefill_token_budget),
            )

        def run(seq: Sequence, n: int) -> None:
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            (singles if n == 1 else chunks).append((seq, n))

        self._admit_waiting(budget, whole_prompts=False, started=False, start=run)
        return ScheduledBatch(items=singles + chunks, num_decode=len(singles))

    def committed_pages(self) -> int:
        """Pages the admitted sequences are expected to take beyond those they hold."""
        return sum(
            self.admission.pages_to_come(s) for s in self.running + self.prefilling + self.loading
        )

    def _num_active(self) -> int:
        return len(self.running) + len(self.prefilling) + len(self.loading)

    def _committed_if_room(self) -> int | None:
        """committed_pages() if someone waits and the running bound has room, else None (skip the sum)."""
        if self.waiting and self.admission.has_room(self._num_active()):
            return self.committed_pages()
        return None

    def _admit(self, seq: Sequence, committed: int) -> bool:
        """Take the head of the queue (its cached prefix pages matched) if the admission policy lets
        it start; otherwise leave it waiting, holding nothing."""
        if not self.admission.has_room(self._num_active()) or not self.admission.fits(
            committed, seq, self.block_manager.num_free_pages
        ):
            self.block_manager.free(seq)
            return False
        self.waiting.popleft()
        self.num_admitted += 1
        return True

    def _start_load(self, seq: Sequence) -> bool:
        """An admitted sequence waits in `loading` if the tier is asked for more of its prefix."""
        if self.tier is None or not self.tier.start_load(seq):
            return False
        seq.status = SequenceStatus.LOADING
        self.loading.append(seq)
        return True

    @staticmethod
    def _loaded(seq: Sequence) -> bool:
        return seq.prefix_load is None or seq.prefix_load.future.done()

    def _loads_done(self) -> list[Sequence]:
        """The loading sequences whose read is back, oldest first, their pages taken in (they stay in
        `loading`: the caller moves them on)."""
        done = []
        for seq in self.loading:
            if not self._loaded(seq):
                continue
            if seq.prefix_load is not None:
                self.tier.finish_load(seq)
            done.append(seq)
        return done

    def _admit_for_prefill(self, budget: int) -> list[Sequence]:
        admitted: list[Sequence] = []
        for seq in self._loads_done():  # first those whose prefix came from the tier
            if budget <= 0 or (admitted and seq.num_uncomputed_tokens > budget):
                break  # the rest go on waiting in `loading`, their reads taken in
            if not self.block_manager.allocate(seq, seq.num_tokens):
                break
            self.loading.remove(seq)
            seq.status = SequenceStatus.PREFILLING
            self.prefilling.append(seq)
            admitted.append(seq)
            budget -= seq.num_uncomputed_tokens

        def send(seq: Sequence, n: int) -> None:
            seq.status = SequenceStatus.PREFILLING
            self.prefilling.append(seq)
            admitted.append(seq)

        self._admit_waiting(budget, whole_prompts=True, started=bool(admitted), start=send)
        return admitted

    def _admit_waiting(
        self,
        budget: int,
        whole_prompts: bool,
        started: bool,
        start: Callable[[Sequence, int], None],
    ) -> None:
        """The one admission loop: take sequences from the head of the queue while the running bound,
        the page reservations and `budget` (tokens) allow, and hand each that computes now to
        `start(seq, tokens)`; one whose prefix is read from the tier goes to `loading` instead.
        `whole_prompts` (remote prefill): a sequence computes all its tokens at once, and none
        past the budget joins a step that `started` with another."""
        committed = self._committed_if_room()
        while committed is not None and self.waiting and budget > 0:
            seq = self.waiting[0]
            if not seq.page_table:
                self.block_manager.match_prefix(seq)
            if whole_prompts and started and seq.num_uncomputed_tokens > budget:
                self.block_manager.free(seq)
                break
            if not self._admit(seq, committed):
                break
            if self._start_load(seq):
                committed += self.admission.pages_to_come(seq)
                continue
            n = (
                seq.num_uncomputed_tokens
                if whole_prompts
                else min(seq.num_uncomputed_tokens, budget)
            )
            self.block_manager.allocate(
                seq, seq.num_computed_tokens + n
            )  # within its reservation: fits
            committed += self.admission.pages_to_come(seq)
            start(seq, n)
            started = True
            budget -= n
        self.blocked = bool(self.waiting)

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
        elif seq in self.loading:
            self.loading.remove(seq)
            seq.prefix_load = None  # its read, if still out, is dropped when it comes back
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        self.blocked = False  # its room may let a waiting sequence start
