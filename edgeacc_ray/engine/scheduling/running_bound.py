"""How many requests may run at once: a bound between 1 and `max_num_seqs` that follows measured TPOT
against the user's `tpot_slo_ms`, so a larger batch is only let in while decode keeps that SLO. There
is no default target: the bound may cut throughput only for an SLO the user asked for.

A window closes once it spans `window_s` and holds MIN_SAMPLES TPOT samples (the time between
consecutive decode steps), as split_controller.window_closes says: a window of fixed length would hold
fewer samples the slower decode is, and go blind exactly when TPOT is furthest over the target (at 287 ms
per token, a 1 s window had 3; the bound stayed at 256 while TPOT was 2.8x the target). A window still
short of samples after STALE_WINDOWS x `window_s` (decode mostly idle) is dropped.
Its p90 moves the bound, in small steps: over the target, down to 7/8 of the batch that missed it; under
80% of the target while the bound held requests back, up by 1/16. A window whose batch was larger
than the bound (still draining after a cut) does not cut again, and a bound that held nobody back
does not grow (it would climb without evidence). Without a target the bound is `max_num_seqs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgeacc_ray.engine.request import LatencyTarget, TargetStats
from edgeacc_ray.engine.split import MIN_SAMPLES, p90, window_closes

HEADROOM = 0.8
DECREASE = 8  # over the target: the batch that missed it, less 1/8
INCREASE = 16  # headroom: up by 1/16 (at least one)


@dataclass
class RunningBound:
    max_num_seqs: int
    tpot_slo_ms: float | None
    window_s: float = 1.0
    value: int = 0  # the bound now; starts at max_num_seqs
    last_tpot_p90_ms: float = 0.0  # of the last window with enough samples
    _samples: list[float] = field(default_factory=list)
    _largest_batch: int = 0
    _held_back: bool = False
    _window_start: float | None = None

    def __post_init__(self) -> None:
        self.value = self.value or self.max_num_seqs

    def target(self) -> TargetStats:
        """The user's TPOT SLO, never a derived one (the bound cuts throughput)."""
        return LatencyTarget("running_bound_tpot", self.tpot_slo_ms, derive=False).stats()

    def held_back(self) -> None:
        """A request could not start because of the bound."""
        self._held_back = True

    def observe(self, now: float, tpot_s: float, num_running: int) -> None:
        """A decode step ended at `now`, `tpot_s` after the previous one, with `num_running` admitted."""
        if self.tpot_slo_ms is None:
            return
        if self._window_start is None:
            self._window_start = now
        self._samples.append(tpot_s * 1000)
        self._largest_batch = max(self._largest_batch, num_running)
        if not window_closes(
            now - self._window_start, self.window_s, len(self._samples) >= MIN_SAMPLES
        ):
            return
        if len(self._samples) >= MIN_SAMPLES:
            self._adjust(p90(self._samples))
        self._samples.clear()
        self._largest_batch, self._held_back, self._window_start = 0, False, now

    def _adjust(self, tpot_ms: float) -> None:
        self.last_tpot_p90_ms = tpot_ms
        batch = self._largest_batch
        if tpot_ms > self.tpot_slo_ms and batch <= self.value:
            self.value = max(1, batch - max(1, batch // DECREASE))
        elif tpot_ms < HEADROOM * self.tpot_slo_ms and self._held_back:
            self.value = min(self.max_num_seqs, self.value + max(1, self.value // INCREASE))
