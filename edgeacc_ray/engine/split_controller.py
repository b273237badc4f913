"""Where Semi-PD's compute split should be now: follows the load at once and the SLOs slowly.

- Load: a phase with no work lends its cores to the other (no prompt waiting: decode computes on
  every core; no sequence decoding: prefill does), after it has been idle for `idle_grace_s`, and
  takes its base share back the moment work arrives.
- SLOs: every `window_s`, the p90 TTFT and TPOT of that window against `ttft_slo_ms` / `tpot_slo_ms`
  move the base share by one core, toward the phase that misses its target while the other has
  headroom (< 80% of its target); each phase always keeps at least one core (Semi-PD's floor).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from edgeacc_ray.engine.core_split import CoreSplit

HEADROOM = 0.8
MIN_SAMPLES = 8


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


@dataclass
class SplitController:
    cores: tuple[int, ...]
    ttft_slo_ms: float
    tpot_slo_ms: float
    window_s: float = 2.0
    idle_grace_s: float = 0.05
    base: int = 0  # cores prefill gets while both phases have work; 0: half
    moves_total: int = 0
    last_ttft_p90_ms: float = 0.0
    last_tpot_p90_ms: float = 0.0
    _ttft: list[float] = field(default_factory=list)
    _tpot: list[float] = field(default_factory=list)
    _window_start: float | None = None
    _prefill_busy_at: float = float("-inf")
    _decode_busy_at: float = float("-inf")
    _split: CoreSplit | None = None

    def __post_init__(self) -> None:
        self.cores = tuple(sorted(self.cores))
        if not self.cores:
            raise ValueError("the split needs at least one core")
        if not self.base:
            self.base = max(1, len(self.cores) // 2)

    def observe_ttft(self, seconds: float) -> None:
        self._ttft.append(seconds * 1000)

    def observe_tpot(self, seconds: float) -> None:
        self._tpot.append(seconds * 1000)

    def decide(self, now: float, prefill_has_work: bool, decode_has_work: bool) -> CoreSplit:
        """The split for the next step; counts a move whenever it differs from the last one."""
        self._adjust_base(now)
        if prefill_has_work:
            self._prefill_busy_at = now
        if decode_has_work:
            self._decode_busy_at = now
        n, cores = len(self.cores), self.cores
        if n == 1:
            split = CoreSplit(cores, cores)  # one core: the phases time-share it
        else:
            k = self.base
            if now - self._prefill_busy_at > self.idle_grace_s:
                k = 0
            elif now - self._decode_busy_at > self.idle_grace_s:
                k = n
            split = CoreSplit(cores[:k], cores[k:])
        if split != self._split:
            if self._split is not None:
                self.moves_total += 1
            self._split = split
        return split

    @property
    def split(self) -> CoreSplit | None:
        return self._split

    def _adjust_base(self, now: float) -> None:
        if self._window_start is None:
            self._window_start = now
        if now - self._window_start < self.window_s:
            return
        if len(self._ttft) >= MIN_SAMPLES and len(self._tpot) >= MIN_SAMPLES:
            ttft, tpot = p90(self._ttft), p90(self._tpot)
            self.last_ttft_p90_ms, self.last_tpot_p90_ms = ttft, tpot
            n = len(self.cores)
            if ttft > self.ttft_slo_ms and tpot < HEADROOM * self.tpot_slo_ms and self.base < n - 1:
                self.base += 1
            elif tpot > self.tpot_slo_ms and ttft < HEADROOM * self.ttft_slo_ms and self.base > 1:
                self.base -= 1
        self._ttft.clear()
        self._tpot.clear()
        self._window_start = now
