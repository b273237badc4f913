"""Where Semi-PD's compute split should be now: follows the load at once and the SLOs slowly.

- Load: a phase with no work lends its cores to the other (no prompt waiting: decode computes on
  every core; no sequence decoding: prefill does), after it has been idle for `idle_grace_s`, and
  takes its base share back the moment work arrives.
- Lending is checked, not assumed: each phase's compute rate (tokens/s) is tracked per number of
  cores it ran on, and a phase stops borrowing cores when it measurably computes no faster with them
  (on a small box the lent core is also the HTTP stack's, and an OpenMP thread that must share a core
  stalls the whole step). The verdict is forgotten every `probe_s`, so lending is tried again.
- Targets: a window closes once it spans `window_s` and holds MIN_SAMPLES of both TTFT and TPOT (a
  fixed-length window would hold too few exactly when they are slowest), or is dropped after
  STALE_WINDOWS x `window_s` without them; its p90 TTFT and TPOT against the targets (the user's SLOs,
  else derived from the fastest windows measured: slo_targets.py) move the base share by one core,
  toward the phase that misses its target while the other has headroom (< 80% of its target); each
  phase always keeps at least one core (Semi-PD's floor).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgeacc_ray.engine.request import LatencyTarget, TargetStats
from edgeacc_ray.engine.split.core_split import CoreSplit

HEADROOM = 0.8
MIN_SAMPLES = 8  # a window stays open until it has this many samples (of each kind it needs)
STALE_WINDOWS = 10  # ... or is dropped when it has not within this many window lengths
LEND_GAIN = 1.1  # borrowing must make a phase at least this much faster
RATE_SAMPLES = 5  # observations of a core count before its rate is trusted
_EWMA = 0.2


def window_closes(span_s: float, window_s: float, enough: bool) -> bool:
    """A measurement window closes once it spans `window_s` and has enough samples, or, short of them,
    after STALE_WINDOWS x `window_s` (to be dropped). Shared by this controller and the running bound."""
    return span_s >= window_s and (enough or span_s >= STALE_WINDOWS * window_s)


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


@dataclass
class SplitController:
    cores: tuple[int, ...]
    ttft_slo_ms: float | None  # the user's; None: derived
    tpot_slo_ms: float | None
    window_s: float = 2.0
    idle_grace_s: float = 0.05
    lend_idle_cores: bool = True  # False: each phase keeps its share even when it has nothing to do
    probe_s: float = 30.0
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
    _rates: dict[tuple[str, int], tuple[float, int]] = field(
        default_factory=dict
    )  # (role, cores) -> (ewma, n)
    _probe_at: float = 0.0
    ttft_target: LatencyTarget = field(init=False)
    tpot_target: LatencyTarget = field(init=False)

    def __post_init__(self) -> None:
        self.ttft_target = LatencyTarget("split_ttft", self.ttft_slo_ms)
        self.tpot_target = LatencyTarget("split_tpot", self.tpot_slo_ms)
        self.cores = tuple(sorted(self.cores))
        if not self.cores:
            raise ValueError("the split needs at least one core")
        if not self.base:
            self.base = max(1, len(self.cores) // 2)

    def observe_ttft(self, seconds: float) -> None:
        self._ttft.append(seconds * 1000)

    def observe_tpot(self, seconds: float) -> None:
        self._tpot.append(seconds * 1000)

    def observe_rate(self, role: str, num_cores: int, tokens: int, seconds: float) -> None:
        """A phase computed `tokens` in `seconds` on `num_cores` cores."""
        if tokens <= 0 or seconds <= 0:
            return
        rate = tokens / seconds
        old, count = self._rates.get((role, num_cores), (rate, 0))
        self._rates[(role, num_cores)] = (old + _EWMA * (rate - old) if count else rate, count + 1)

    def lending_helps(self, role: str) -> bool:
        """False once `role` has measurably computed no faster on every core than on its own share."""
        n = len(self.cores)
        own = n - self.base if role == "decode" else self.base
        lent, lent_n = self._rates.get((role, n), (0.0, 0))
        base, base_n = self._rates.get((role, own), (0.0, 0))
        if lent_n < RATE_SAMPLES or base_n < RATE_SAMPLES:
            return True
        return lent >= LEND_GAIN * base

    def decide(self, now: float, prefill_has_work: bool, decode_has_work: bool) -> CoreSplit:
        """The split for the next step; counts a move whenever it differs from the last one."""
        self._adjust_base(now)
        if now - self._probe_at > self.probe_s:  # forget verdicts on lending: conditions change
            self._probe_at = now
            n = len(self.cores)
            self._rates = {key: value for key, value in self._rates.items() if key[1] != n}
        if prefill_has_work:
            self._prefill_busy_at = now
        if decode_has_work:
            self._decode_busy_at = now
        n, cores = len(self.cores), self.cores
        if n == 1:
            split = CoreSplit(cores, cores)  # one core: the phases time-share it
        else:
            k = self.base
            prefill_idle = now - self._prefill_busy_at > self.idle_grace_s
            decode_idle = now - self._decode_busy_at > self.idle_grace_s
            if self.lend_idle_cores and prefill_idle and self.lending_helps("decode"):
                k = 0
            elif (
                self.lend_idle_cores
                and decode_idle
                and not prefill_idle
                and self.lending_helps("prefill")
            ):
                k = n
            split = CoreSplit(cores[:k], cores[k:])
        if split != self._split:
            if self._split is not None:
                self.moves_total += 1
            self._split = split
        return split

    def targets(self) -> list[TargetStats]:
        return [self.ttft_target.stats(), self.tpot_target.stats()]

    @property
    def current(self) -> CoreSplit | None:
        return self._split

    def _adjust_base(self, now: float) -> None:
        if self._window_start is None:
            self._window_start = now
        enough = len(self._ttft) >= MIN_SAMPLES and len(self._tpot) >= MIN_SAMPLES
        if not window_closes(now - self._window_start, self.window_s, enough):
            return
        if enough:
            ttft, tpot = p90(self._ttft), p90(self._tpot)
            self.last_ttft_p90_ms, self.last_tpot_p90_ms = ttft, tpot
            self.ttft_target.observe(ttft)
            self.tpot_target.observe(tpot)
            ttft_ms, tpot_ms, n = self.ttft_target.ms, self.tpot_target.ms, len(self.cores)
            if ttft > ttft_ms and tpot < HEADROOM * tpot_ms and self.base < n - 1:
                self.base += 1
            elif tpot > tpot_ms and ttft < HEADROOM * ttft_ms and self.base > 1:
                self.base -= 1
        self._ttft.clear()
        self._tpot.clear()
        self._window_start = now
