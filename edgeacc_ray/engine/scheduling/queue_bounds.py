"""Early, honest overload answers: a request is refused when it arrives if `max_queued_requests`
already wait, or if its wait to start would be longer than `max_queue_wait_s`; a request still
waiting to start after `queue_timeout_s` is dropped. Both answers say when to retry: the time the
requests waiting now need to start at the measured drain rate, so a retry does not jump ahead of them
and finds room.

The drain rate is requests started per second while some request waited: an EWMA of samples over
`DRAIN_WINDOW_S` of such time (idle time says nothing about how fast the queue empties). The wait is
the shorter of two estimates: the queue ahead at that rate, and the batch's forecast
(start_forecast.py). The forecast alone covers a burst, which arrives before the first rate sample, and
a request that can start now (a free slot and room for its pages) whatever the rate says; the rate
corrects a forecast that overstates, as it does where prompts stall decoding (Semi-PD on two cores).
Without either, only the count bound applies and Retry-After is `MIN_RETRY_AFTER_S`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

from edgeacc_ray.engine.request import EngineOverloaded, QueueTimeout, Sequence

if TYPE_CHECKING:
    from edgeacc_ray.engine.scheduling.start_forecast import BatchForecast

DRAIN_WINDOW_S = 1.0
DRAIN_EWMA = 0.3
MIN_RETRY_AFTER_S = 1
MAX_RETRY_AFTER_S = 600  # a stalled queue (no start in a whole window) still gets a finite answer


class DrainRate:
    def __init__(self) -> None:
        self.per_s: float | None = None
        self._last: float | None = None
        self._was_waiting = False
        self._busy_s = 0.0
        self._started = 0

    def observe(self, now: float, num_started: int, num_waiting: int) -> None:
        """A step at `now` started `num_started` requests and left `num_waiting` waiting."""
        if self._last is not None and self._was_waiting:
            self._busy_s += now - self._last
            self._started += num_started
            if self._busy_s >= DRAIN_WINDOW_S:
                sample = self._started / self._busy_s
                self.per_s = (
                    sample
                    if self.per_s is None
                    else self.per_s + DRAIN_EWMA * (sample - self.per_s)
                )
                self._busy_s, self._started = 0.0, 0
        self._last, self._was_waiting = now, num_waiting > 0

    def seconds_for(self, num_requests: int) -> float | None:
        """Time for `num_requests` to start at the measured rate; None before the first measurement."""
        if self.per_s is None:
            return None
        return num_requests / self.per_s if self.per_s > 0 else math.inf


class QueueBounds:
    def __init__(self, max_queued: int, max_wait_s: float | None, timeout_s: float | None) -> None:
        self.max_queued = max_queued  # -1: unbounded
        self.max_wait_s = max_wait_s
        self.timeout_s = timeout_s
        self.drain = DrainRate()

    def check_arrival(self, num_waiting: int, forecast: BatchForecast | None = None) -> None:
        """Raise EngineOverloaded if one more request may not wait behind `num_waiting`."""
        if 0 <= self.max_queued <= num_waiting:
            raise EngineOverloaded(
                f"the server is at capacity: {num_waiting} requests are waiting to start "
                f"(max_queued_requests={self.max_queued})",
                self.retry_after_s(num_waiting, forecast),
                "queue_full",
            )
        if self.max_wait_s is None:
            return
        wait = self.drain.seconds_for(num_waiting + 1)
        if forecast is not None and (
            wait is None or wait > self.max_wait_s
        ):  # else the shorter fits anyway
            predicted = forecast.wait_s(horizon_s=self.max_wait_s)
            wait = predicted if wait is None else min(wait, predicted)
        if wait is not None and wait > self.max_wait_s:
            raise EngineOverloaded(
                f"the server is at capacity: a new request would wait more than "
                f"max_queue_wait_s={self.max_wait_s:g} s to start",
                self.retry_after_s(num_waiting, forecast),
                "queue_wait_too_long",
            )

    def expired(self, waiting: Iterable[Sequence], now: float) -> list[Sequence]:
        """The waiting sequences that arrived more than the timeout ago and never started (a retracted
        one has started: it is not dropped)."""
        if self.timeout_s is None:
            return []
        cutoff = now - self.timeout_s
        return [
            seq for seq in waiting if seq.arrival_time < cutoff and seq.first_token_time is None
        ]

    def timeout_error(self, num_waiting: int) -> QueueTimeout:
        return QueueTimeout(
            f"the request waited more than queue_timeout_s={self.timeout_s:g} s to start; "
            "the server is overloaded",
            self.retry_after_s(num_waiting),
            "queue_timeout",
        )

    def retry_after_s(self, num_waiting: int, forecast: BatchForecast | None = None) -> int:
        """Seconds until the `num_waiting` requests waiting now have started, at the drain rate (or as
        the batch forecasts, before a rate is measured)."""
        wait = self.drain.seconds_for(num_waiting)
        if wait is None and forecast is not None:
            wait = forecast.queue_s()
        if wait is None:
            return MIN_RETRY_AFTER_S
        return max(MIN_RETRY_AFTER_S, math.ceil(min(wait, MAX_RETRY_AFTER_S)))
