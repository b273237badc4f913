"""Request latency histograms kept by the engine (TTFT, inter-token, TPOT, end-to-end), so that
they count every request once and survive restarts of the HTTP replicas in front of it. Times run
from the request's arrival at the engine; the HTTP hop before that is not in them."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

# SGLang's bounds, with finer low ends (CPU steps are milliseconds).
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    15.0,
    20.0,
    25.0,
    30.0,
    60.0,
    120.0,
)
ITL_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
)
E2E_BUCKETS = (
    0.05,
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    90.0,
    120.0,
    300.0,
)


@dataclass(frozen=True)
class HistogramSnapshot:
    """Upper bounds and per-bucket (not cumulative) counts; the last count is above every bound."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float


class Histogram:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.bounds, tuple(self.counts), self.sum)


@dataclass(frozen=True)
class LatencySnapshot:
    ttft: HistogramSnapshot
    itl: HistogramSnapshot
    tpot: HistogramSnapshot
    e2e: HistogramSnapshot


class LatencyMetrics:
    """Observed by the engine thread as tokens come out."""

    def __init__(self) -> None:
        self.ttft, self.itl = Histogram(TTFT_BUCKETS), Histogram(ITL_BUCKETS)
        self.tpot, self.e2e = Histogram(ITL_BUCKETS), Histogram(E2E_BUCKETS)

    def token(
        self, arrival: float, first: float | None, previous: float | None, now: float
    ) -> None:
        """A token came out at `now`; `first`/`previous` are the request's earlier token times, if any."""
        if first is None:
            self.ttft.observe(now - arrival)
        elif previous is not None:
            self.itl.observe(now - previous)

    def finished(
        self, arrival: float, first: float | None, num_output_tokens: int, now: float
    ) -> None:
        self.e2e.observe(now - arrival)
        if first is not None and num_output_tokens > 1:
            self.tpot.observe((now - first) / (num_output_tokens - 1))

    def snapshot(self) -> LatencySnapshot:
        return LatencySnapshot(
            self.ttft.snapshot(), self.itl.snapshot(), self.tpot.snapshot(), self.e2e.snapshot()
        )
