"""When would a new request start? A forecast from the batch as it stands, one of the queue's two wait
estimates (queue_bounds.py takes the shorter of it and the drain rate's).

The drain rate (queue_bounds.DrainRate) needs a second of waiting before its first sample, and a burst
fills the queue within that second: at 2,048 clients the queue took a thousand requests that then
waited a minute. Nor does a rate see a free slot. The forecast needs no history: each admitted request frees its slot and its reserved
pages when its expected output is done (the admission policy's expected tokens x the measured time per
decode step), and the waiting requests take them in order, each when a slot and its reservation are
free. The new request's start is when its turn comes. Expected outputs follow the learned new-token
ratio, so the forecast is exact for fixed-length outputs and errs late (refusing early) otherwise.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeacc_ray.engine.request import Sequence
    from edgeacc_ray.engine.scheduling.scheduler import Scheduler

DEFAULT_STEP_S = 0.05  # time per decode step before one is measured and without a TPOT target
STEP_EWMA = 0.2


@dataclass(frozen=True)
class Job:
    """A request as the forecast sees it: the pages it holds or reserves, freed when it ends, and its
    time to the end (from now if admitted, from its start if waiting)."""

    pages: int
    seconds: float


def start_time_s(
    active: Iterable[Job],
    waiting: Iterable[Job],
    free_slots: int,
    free_pages: int,
    horizon_s: float = math.inf,
) -> float:
    """Seconds from now until the last of `waiting` starts, all of them starting in order; inf if that
    is beyond `horizon_s` or it can never fit."""
    ends = [(job.seconds, job.pages) for job in active]
    heapq.heapify(ends)
    now = 0.0
    for job in waiting:
        while free_slots < 1 or free_pages < job.pages:
            if not ends:
                return math.inf
            now, pages = heapq.heappop(ends)
            if now > horizon_s:
                return math.inf
            free_slots, free_pages = free_slots + 1, free_pages + pages
        free_slots, free_pages = free_slots - 1, free_pages - job.pages
        heapq.heappush(ends, (now + job.seconds, job.pages))
    return now


class StepTime:
    """Time per decode step: an EWMA of measured TPOT, starting from the TPOT target (the running
    bound keeps steps under it) or DEFAULT_STEP_S."""

    def __init__(self, tpot_slo_ms: float | None) -> None:
        self.seconds = tpot_slo_ms / 1000 if tpot_slo_ms else DEFAULT_STEP_S
        self.measured = False

    def observe(self, tpot_s: float) -> None:
        self.seconds = (
            tpot_s if not self.measured else self.seconds + STEP_EWMA * (tpot_s - self.seconds)
        )
        self.measured = True


class BatchForecast:
    """The forecast for one arriving request against the scheduler's batch and queue as they stand."""

    def __init__(self, scheduler: "Scheduler", step: StepTime, new: "Sequence") -> None:
        self.scheduler, self.step, self.new = scheduler, step, new

    def _job(self, seq: "Sequence") -> Job:
        admission = self.scheduler.admission
        expected_tokens = admission.reserved_tokens(seq) - seq.num_tokens + 1
        return Job(
            len(seq.page_table) + admission.pages_to_come(seq),
            max(1, expected_tokens) * self.step.seconds,
        )

    def _start_s(self, waiting: list["Sequence"], horizon_s: float) -> float:
        sched = self.scheduler
        active = sched.running + sched.prefilling + sched.loading
        free_slots = max(0, sched.admission.bound.value - len(active))
        free_pages = sched.block_manager.num_free_pages - sched.committed_pages()
        return start_time_s(
            map(self._job, active), map(self._job, waiting), free_slots, free_pages, horizon_s
        )

    def wait_s(self, horizon_s: float) -> float:
        """Until the new request would start, behind everyone waiting (inf beyond `horizon_s`)."""
        return self._start_s([*self.scheduler.waiting, self.new], horizon_s)

    def queue_s(self) -> float:
        """Until everyone waiting now has started."""
        return self._start_s(list(self.scheduler.waiting), math.inf)
