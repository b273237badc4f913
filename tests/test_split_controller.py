"""The Semi-PD split policy and its shared control block: cores follow the load at once, the SLO
targets move the base share one core per window with a floor of one core per phase, and each
process applies only its own role's share."""

from __future__ import annotations

import os

import torch

from edgeacc_ray.engine.split.core_split import ControlBlock, CoreSplit, CoreSplitFollower
from edgeacc_ray.engine.split.split_controller import MIN_SAMPLES, STALE_WINDOWS, SplitController


def controller(cores=(0, 1, 2, 3), **kw) -> SplitController:
    return SplitController(
        tuple(cores), ttft_slo_ms=1000, tpot_slo_ms=50, window_s=1.0, idle_grace_s=0.05, **kw
    )


def test_idle_phase_lends_its_cores_after_the_grace_and_takes_them_back_at_once():
    c = controller()
    assert c.decide(0.0, True, True) == CoreSplit((0, 1), (2, 3))
    assert c.decide(0.03, False, True) == CoreSplit((0, 1), (2, 3))  # within the grace: no move
    assert c.decide(0.1, False, True) == CoreSplit(
        (), (0, 1, 2, 3)
    )  # no prompt waits: decode takes all
    assert c.decide(0.11, True, True) == CoreSplit((0, 1), (2, 3))  # a prompt arrives: back at once
    assert c.decide(0.3, True, False) == CoreSplit(
        (0, 1, 2, 3), ()
    )  # nothing decodes: prefill takes all
    assert c.moves_total == 3


def test_without_lending_each_phase_keeps_its_share():
    c = controller(lend_idle_cores=False)
    assert c.decide(0.0, False, False) == c.decide(5.0, False, True) == CoreSplit((0, 1), (2, 3))
    assert c.moves_total == 0


def test_slo_misses_move_the_base_one_core_per_window_with_a_floor():
    c = controller()
    c.decide(0.0, True, True)
    for window in range(1, 5):  # TTFT misses, TPOT has headroom: prefill gains a core per window
        for _ in range(10):
            c.observe_ttft(2.0)
            c.observe_tpot(0.01)
        c.decide(float(window) + 0.01, True, True)
    assert c.base == 3  # n - 1: decode keeps one core
    assert c.decide(5.0, True, True) == CoreSplit((0, 1, 2), (3,))
    for window in range(6, 12):  # now TPOT misses while TTFT has headroom
        for _ in range(10):
            c.observe_ttft(0.1)
            c.observe_tpot(0.2)
        c.decide(float(window) + 0.01, True, True)
    assert c.base == 1 and c.last_tpot_p90_ms == 200.0


def test_a_window_with_both_targets_met_or_too_few_samples_does_not_move():
    c = controller()
    c.decide(0.0, True, True)
    for _ in range(20):
        c.observe_ttft(0.5)
        c.observe_tpot(0.03)
    c.decide(1.5, True, True)
    c.observe_ttft(9.0)  # one bad sample is not a trend
    c.decide(3.0, True, True)
    assert c.base == 2


def test_a_window_stays_open_until_both_kinds_of_sample_are_enough_then_moves():
    """Slow prompts give few TTFT samples per window; the window waits for them rather than going blind."""
    c = controller()
    c.decide(0.0, True, True)
    for i in range(MIN_SAMPLES - 1):
        c.observe_ttft(2.0)
        c.observe_tpot(0.01)
        c.decide(0.5 * (i + 1), True, True)
    assert c.base == 2  # 3.5 s, one TTFT sample short: open
    c.observe_ttft(2.0)
    c.observe_tpot(0.01)
    c.decide(4.0, True, True)
    assert c.base == 3 and c.last_ttft_p90_ms == 2000.0
    c.observe_ttft(
        2.0
    )  # then a window that never fills is dropped after STALE_WINDOWS window lengths
    c.decide(4.0 + STALE_WINDOWS * c.window_s, True, True)
    for _ in range(MIN_SAMPLES - 1):
        c.observe_ttft(2.0)
        c.observe_tpot(0.01)
    c.decide(5.0 + STALE_WINDOWS * c.window_s, True, True)
    assert c.base == 3  # the dropped sample does not complete the new window


def test_one_core_is_time_shared():
    c = controller(cores=(0,))
    assert c.decide(0.0, True, True) == CoreSplit((0,), (0,))


def test_followers_apply_only_their_role_and_only_on_change():
    words = torch.zeros(8, dtype=torch.int64)
    control = ControlBlock(words)
    allowed, threads = sorted(os.sched_getaffinity(0)), torch.get_num_threads()
    prefill, decode = CoreSplitFollower(control, "prefill"), CoreSplitFollower(control, "decode")
    try:
        control.publish(CoreSplit(tuple(allowed[:1]), tuple(allowed[-1:])))
        assert control.read()[1] == CoreSplit(tuple(allowed[:1]), tuple(allowed[-1:]))
        assert decode.sync() == tuple(allowed[-1:])
        assert os.sched_getaffinity(0) == set(allowed[-1:]) and torch.get_num_threads() == 1
        control.publish(CoreSplit((), tuple(allowed)))  # prefill idle: it keeps its last cores
        assert prefill.sync() == ()  # never had any: stays unpinned
        assert decode.sync() == tuple(allowed)
        assert os.sched_getaffinity(0) == set(allowed)
    finally:
        os.sched_setaffinity(0, allowed)
        torch.set_num_threads(threads)


def test_lending_stops_when_the_borrowed_cores_do_not_help_and_is_probed_again():
    c = controller(cores=(0, 1))
    c.probe_s = 10.0
    assert c.decide(0.0, False, True) == CoreSplit((), (0, 1))  # no data yet: lend
    for _ in range(6):
        c.observe_rate("decode", 1, 32, 0.020)  # 1,600 tok/s on its own core
        c.observe_rate("decode", 2, 32, 0.030)  # slower on two (the lent core is busy elsewhere)
    assert not c.lending_helps("decode")
    assert c.decide(1.0, False, True) == CoreSplit((0,), (1,))  # keeps its own share
    assert c.decide(11.0, False, True) == CoreSplit((), (0, 1))  # verdict forgotten: tried again
    for _ in range(6):
        c.observe_rate("decode", 1, 32, 0.020)
        c.observe_rate("decode", 2, 32, 0.012)  # now it pays
    assert c.lending_helps("decode") and c.decide(12.0, False, True) == CoreSplit((), (0, 1))


def _windows(c: SplitController, start: int, ttft_s: float, tpot_s: float, count: int = 1) -> None:
    for window in range(start, start + count):
        for _ in range(MIN_SAMPLES):
            c.observe_ttft(ttft_s)
            c.observe_tpot(tpot_s)
        c.decide(float(window) + 0.01, True, True)


def test_without_slos_the_targets_derive_from_the_device_slow_looser_fast_tighter():
    """No user SLO: each target is DERIVED_FACTOR x the fastest window measured, so a device whose
    steps take 10x longer gets a 10x looser target, and none exists before the first window."""
    from edgeacc_ray.engine.request.slo_targets import DERIVED_FACTOR

    targets = {}
    for name, tpot_s in (("slow", 0.2), ("fast", 0.02)):
        c = SplitController((0, 1, 2, 3), ttft_slo_ms=None, tpot_slo_ms=None, window_s=1.0)
        c.decide(0.0, True, True)
        assert [t.source for t in c.targets()] == ["none", "none"]
        _windows(c, 1, ttft_s=10 * tpot_s, tpot_s=tpot_s)
        targets[name] = {t.name: t for t in c.targets()}
        assert c.base == 2  # the first window only sets the floor: nothing is over 3x its own best
    slow, fast = targets["slow"]["split_tpot"], targets["fast"]["split_tpot"]
    assert (slow.source, fast.source) == ("derived", "derived")
    assert slow.ms == DERIVED_FACTOR * 200.0 and fast.ms == DERIVED_FACTOR * 20.0
    assert targets["slow"]["split_ttft"].ms == 10 * targets["fast"]["split_ttft"].ms


def test_a_derived_target_moves_the_split_when_a_phase_falls_far_behind_its_best():
    c = SplitController((0, 1, 2, 3), ttft_slo_ms=None, tpot_slo_ms=None, window_s=1.0)
    c.decide(0.0, True, True)
    _windows(c, 1, ttft_s=0.1, tpot_s=0.02)  # the floors: 100 ms and 20 ms
    _windows(c, 2, ttft_s=0.25, tpot_s=0.02)  # 2.5x the best TTFT: within the derived 3x
    assert c.base == 2
    _windows(
        c, 3, ttft_s=0.5, tpot_s=0.02
    )  # 5x: prefill misses its derived target, decode has headroom
    assert c.base == 3


def test_a_user_slo_wins_over_the_derived_target():
    c = SplitController((0, 1, 2, 3), ttft_slo_ms=None, tpot_slo_ms=25.0, window_s=1.0)
    c.decide(0.0, True, True)
    _windows(c, 1, ttft_s=0.1, tpot_s=0.02)
    tpot = {t.name: t for t in c.targets()}["split_tpot"]
    assert (tpot.source, tpot.ms, tpot.floor_ms) == ("user", 25.0, 20.0)
