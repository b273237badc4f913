"""The running bound follows TPOT against its target: down when a window's p90 misses it, up while
there is headroom and the bound held requests back, never outside [1, max_num_seqs]. Driven with
synthetic measurements (it is a unit)."""

from __future__ import annotations

from edgeacc_ray.engine.scheduling.running_bound import MIN_SAMPLES, RunningBound
from edgeacc_ray.engine.split.split_controller import STALE_WINDOWS


def window(
    bound: RunningBound, start: float, tpot_ms: float, batch: int, held_back: bool = False
) -> float:
    """One window of decode steps at `tpot_ms` with `batch` running, after `start` (where the last
    one closed); returns where this one closes."""
    if held_back:
        bound.held_back()
    for k in range(1, MIN_SAMPLES + 1):
        bound.observe(start + k * bound.window_s / MIN_SAMPLES, tpot_ms / 1000, batch)
    return start + bound.window_s


def test_the_bound_goes_down_over_the_target_and_back_up_with_headroom():
    bound = RunningBound(max_num_seqs=64, tpot_slo_ms=100.0)
    assert bound.value == 64
    bound.observe(0.0, 0.05, 40)  # the first decode step opens the first window
    t = window(bound, 0.0, 50.0, batch=40)
    assert bound.value == 64  # under target, nobody held back: no change
    t = window(bound, t, 150.0, batch=40)
    assert bound.value == 35 and bound.last_tpot_p90_ms == 150.0  # the batch that missed, less 1/8
    t = window(bound, t, 150.0, batch=40)
    assert bound.value == 35  # still draining the larger batch: no second cut
    t = window(bound, t, 150.0, batch=35)
    assert bound.value == 31
    t = window(bound, t, 90.0, batch=31, held_back=True)
    assert bound.value == 31  # within 80% .. 100% of the target: hold
    values = []
    for _ in range(30):
        t = window(bound, t, 50.0, batch=bound.value, held_back=True)
        values.append(bound.value)
    assert values[0] == 32 and values == sorted(values)  # up by 1/16 (at least one) per window
    assert values[-1] == 64  # capped at max_num_seqs


def test_the_bound_never_drops_below_one():
    bound = RunningBound(max_num_seqs=4, tpot_slo_ms=10.0)
    bound.observe(0.0, 0.5, 4)
    t = 0.0
    for _ in range(10):
        t = window(bound, t, 500.0, batch=bound.value)
    assert bound.value == 1


def test_slow_decode_keeps_the_window_open_until_it_has_enough_samples():
    """At 300 ms per token a 1 s window holds 3 samples; the bound must still see the miss."""
    bound = RunningBound(max_num_seqs=256, tpot_slo_ms=100.0)
    bound.observe(0.0, 0.3, 64)
    for k in range(1, MIN_SAMPLES - 1):
        bound.observe(0.3 * k, 0.3, 64)
    assert bound.value == 256  # 1.8 s, MIN_SAMPLES - 1 samples: still open
    bound.observe(0.3 * (MIN_SAMPLES - 1), 0.3, 64)
    assert bound.value == 56 and bound.last_tpot_p90_ms == 300.0  # 64 less 1/8


def test_a_window_that_stays_short_of_samples_is_dropped():
    bound = RunningBound(max_num_seqs=16, tpot_slo_ms=10.0)
    for i in range(MIN_SAMPLES - 2):
        bound.observe(i * 0.1, 1.0, 16)
    bound.observe(
        STALE_WINDOWS * bound.window_s, 1.0, 16
    )  # one short and stale: dropped, not acted on
    assert bound.value == 16
    for i in range(1, MIN_SAMPLES + 1):
        bound.observe(STALE_WINDOWS * bound.window_s + i * 0.2, 1.0, 16)
    assert bound.value == 14  # the next window starts afresh and acts once it is full


def test_without_a_target_the_bound_is_max_num_seqs():
    bound = RunningBound(max_num_seqs=8, tpot_slo_ms=None)
    bound.observe(0.0, 10.0, 8)
    window(bound, 0.0, 10_000.0, batch=8)
    assert bound.value == 8


def test_the_default_has_no_tpot_target_and_never_cuts_the_bound():
    """A default TPOT target would be a constant tuned on another box: without the user's SLO the
    bound stays at max_num_seqs however slow decode is, and says it has no target."""
    from edgeacc_ray.config.engine import EngineSettings

    assert EngineSettings().tpot_slo_ms is None
    bound = RunningBound(max_num_seqs=64, tpot_slo_ms=EngineSettings().tpot_slo_ms)
    for step in range(200):
        bound.observe(step * 0.5, 0.5, 64)  # 500 ms per token
    assert bound.value == 64
    assert (bound.target().source, bound.target().ms) == ("none", None)
    assert RunningBound(8, tpot_slo_ms=40.0).target().source == "user"
