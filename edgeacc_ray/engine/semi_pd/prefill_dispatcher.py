"""The decode side's link to the prefill process: turns admitted sequences into `PrefillBatch`es,
keeps a bounded number in flight, and hands back the batches that came home (or failed).

How a batch travels is the executor's business (`PrefillExecutor`): a local child process for the
offline engine (engine/semi_pd/process_prefill_executor.py), a Ray Serve handle in the deployments.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from edgeacc_ray.engine.kv import StorageSpec
from edgeacc_ray.engine.request import Sequence
from edgeacc_ray.engine.semi_pd.prefill_messages import (
    PrefillBatch,
    PrefillBatchResult,
    PrefillTask,
)


class PrefillExecutor(Protocol):
    def submit(self, batch: PrefillBatch) -> cf.Future:
        """Run the batch on the prefill side; the future resolves to a PrefillBatchResult."""


@dataclass
class InFlight:
    seqs: list[Sequence]
    future: cf.Future
    sent_at: float
    num_tokens: int  # prompt tokens to compute
    num_cores: int  # prefill's cores when it was sent


class PrefillDispatcher:
    def __init__(
        self, storage: StorageSpec, executor: PrefillExecutor, batch_tokens: int, max_in_flight: int
    ) -> None:
        self.storage = storage
        self.executor = executor
        self.batch_tokens = batch_tokens
        self.max_in_flight = max_in_flight
        self.in_flight: list[InFlight] = []
        self.notify: Callable[[], None] | None = (
            None  # called from any thread when a batch completes
        )
        self.batches_total = 0
        self.compute_seconds_total = 0.0  # prefill side's compute time of completed batches
        self.roundtrip_seconds_total = 0.0  # dispatch to completion, as this side saw it

    def token_budget(self) -> int:
        """Prompt tokens the scheduler may hand over now (0 when enough batches are in flight)."""
        return self.batch_tokens if len(self.in_flight) < self.max_in_flight else 0

    def dispatch(self, seqs: list[Sequence], num_cores: int) -> None:
        tasks = [
            PrefillTask(
                request_id=seq.request_id,
                token_ids=list(seq.token_ids),
                num_prompt_tokens=seq.num_prompt_tokens,
                num_computed_tokens=seq.num_computed_tokens,
                page_table=list(seq.page_table),
                params=seq.params,
                generator_state=seq.generator.get_state() if seq.generator is not None else None,
                grammar_mask=seq.grammar_mask,
                eos_token_ids=seq.eos_token_ids,
                next_prompt_logprob=seq.next_prompt_logprob,
            )
            for seq in seqs
        ]
        batch = PrefillBatch(self.storage, tasks)
        try:
            future = self.executor.submit(batch)
        except Exception as exc:  # the executor is broken: fail this batch like a lost one
            future = cf.Future()
            future.set_exception(exc)
        tokens = sum(seq.num_uncomputed_tokens for seq in seqs)
        self.in_flight.append(InFlight(seqs, future, time.monotonic(), tokens, num_cores))
        self.batches_total += 1
        if self.notify is not None:
            future.add_done_callback(lambda _: self.notify())

    def completed(self) -> list[tuple[InFlight, PrefillBatchResult | BaseException]]:
        """Batches that finished since the last call, oldest first, with their result or error."""
        done = [f for f in self.in_flight if f.future.done()]
        now = time.monotonic()
        for flight in done:
            self.in_flight.remove(flight)
            self.roundtrip_seconds_total += now - flight.sent_at
            if flight.future.exception() is None:
                self.compute_seconds_total += flight.future.result().compute_seconds
        return [(f, f.future.exception() or f.future.result()) for f in done]

    def waiting(self) -> bool:
        """Batches are out and none has come back yet."""
        return bool(self.in_flight) and not any(f.future.done() for f in self.in_flight)

    def wait(self, timeout: float | None = None) -> None:
        """Block until some in-flight batch completes (or the timeout passes)."""
        if self.in_flight:
            cf.wait(
                [f.future for f in self.in_flight], timeout=timeout, return_when=cf.FIRST_COMPLETED
            )
