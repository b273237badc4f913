"""Early, honest overload answers: a request beyond max_queued_requests, or one that would wait
longer than max_queue_wait_s at the measured drain rate, is refused on arrival with EngineOverloaded
and a Retry-After from that rate; one that waited past queue_timeout_s is dropped with QueueTimeout,
holding nothing. Both reach AsyncLLMEngine's callers and survive pickling (the Ray hop); the offline
LLM has no queue bounds unless asked."""

from __future__ import annotations

import asyncio
import math
import pickle
import random
import time

import pytest

from edgeacc_ray.config import EngineConfig
from edgeacc_ray.engine import AsyncLLMEngine, LLMEngine
from edgeacc_ray.engine.request import (
    EngineOverloaded,
    EngineUnavailable,
    QueueTimeout,
    SamplingParams,
)
from edgeacc_ray.engine.scheduling import queue_bounds
from edgeacc_ray.engine.scheduling.queue_bounds import DrainRate, QueueBounds
from edgeacc_ray.engine.scheduling.start_forecast import Job, start_time_s
from edgeacc_ray.llm import LLM
from tests.test_engine_pages import assert_pool_idle

TINY = dict(model="tiny", dtype="float32", num_pages=256, page_size=4, tpot_slo_ms=None)


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, 8000 - 16) for _ in range(n)]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


# ---- the bounds as a unit, on a synthetic clock -----------------------------------------------------


def drained(per_s: int) -> DrainRate:
    """A drain rate measured over two busy seconds that each started `per_s` requests."""
    rate = DrainRate()
    for second in range(3):
        rate.observe(float(second), per_s if second else 0, num_waiting=50)
    return rate


def test_drain_rate_counts_only_time_with_requests_waiting():
    rate = DrainRate()
    assert rate.seconds_for(10) is None
    rate.observe(0.0, 0, num_waiting=0)
    rate.observe(100.0, 3, num_waiting=5)  # idle before: neither the time nor the starts count
    assert rate.per_s is None
    for i in range(1, 11):
        rate.observe(100.0 + i * 0.1, 2, num_waiting=5)
    assert rate.per_s == pytest.approx(20.0)
    assert rate.seconds_for(10) == pytest.approx(0.5)


def test_queue_full_is_refused_with_retry_after_from_the_drain_rate():
    bounds = QueueBounds(max_queued=30, max_wait_s=None, timeout_s=None)
    with pytest.raises(EngineOverloaded) as info:
        bounds.check_arrival(30)
    assert info.value.code == "queue_full" and info.value.retry_after_s == 1  # nothing measured yet
    assert "30 requests are waiting" in str(info.value)
    bounds.drain = drained(per_s=4)
    bounds.check_arrival(29)
    with pytest.raises(EngineOverloaded) as info:
        bounds.check_arrival(30)
    assert info.value.retry_after_s == math.ceil(30 / 4.0)  # when the 30 waiting now have started


def test_a_predicted_wait_beyond_the_bound_is_refused():
    bounds = QueueBounds(max_queued=-1, max_wait_s=5.0, timeout_s=None)
    bounds.check_arrival(
        10_000
    )  # no measurement yet: only the count bound applies (unbounded here)
    bounds.drain = drained(per_s=10)
    bounds.check_arrival(49)  # the 50th would wait 5 s
    with pytest.raises(EngineOverloaded) as info:
        bounds.check_arrival(50)
    assert info.value.code == "queue_wait_too_long" and info.value.retry_after_s == 5
    assert "max_queue_wait_s=5 s" in str(info.value)
    bounds.drain = drained(per_s=0)  # a stalled queue: refused, with a finite Retry-After
    with pytest.raises(EngineOverloaded) as info:
        bounds.check_arrival(1)
    assert info.value.retry_after_s == queue_bounds.MAX_RETRY_AFTER_S


def test_the_forecast_starts_waiters_as_slots_and_pages_free():
    running = [Job(pages=4, seconds=1.0), Job(pages=2, seconds=3.0)]
    one_slot = dict(free_slots=1, free_pages=10)
    assert start_time_s(running, [Job(1, 5.0)], **one_slot) == 0.0  # a free slot: at once
    assert (
        start_time_s(running, [Job(1, 5.0), Job(1, 5.0)], **one_slot) == 1.0
    )  # the first to end frees one
    assert start_time_s(running, [Job(1, 5.0)] * 3, **one_slot) == 3.0
    assert (
        start_time_s(running, [Job(1, 5.0)] * 4, **one_slot) == 5.0
    )  # behind the first waiter's own run
    assert start_time_s(running, [Job(1, 5.0)] * 4, **one_slot, horizon_s=4.0) == math.inf
    # Slots to spare but pages short: it starts when enough pages come back.
    assert start_time_s(running, [Job(11, 1.0)], free_slots=8, free_pages=7) == 1.0
    assert start_time_s(running, [Job(13, 1.0)], free_slots=8, free_pages=7) == 3.0
    assert (
        start_time_s(running, [Job(99, 1.0)], free_slots=8, free_pages=7) == math.inf
    )  # never fits


def test_a_burst_is_refused_at_the_forecast_before_any_rate_is_measured():
    """Two slots, 10-token outputs reserved in full, 0.1 s a step: two start now, two when they end
    (1 s, within max_queue_wait_s), the fifth would wait 2 s. No drain rate exists yet."""
    engine = LLMEngine(
        EngineConfig(
            max_num_seqs=2,
            max_queued_requests=-1,
            max_queue_wait_s=1.0,
            new_token_ratio_init=1.0,
            **TINY,
        )
    )
    engine.step_time.seconds = 0.1
    for i in range(4):
        engine.add_request(f"r{i}", ids(i, 6), greedy(10))
    with pytest.raises(EngineOverloaded) as info:
        engine.add_request("fifth", ids(9, 6), greedy(10))
    assert info.value.code == "queue_wait_too_long"
    assert info.value.retry_after_s == 1  # when the four waiting now have started, as forecast
    assert engine.queue_bounds.drain.per_s is None and "fifth" not in engine.sequences
    while engine.has_unfinished():
        engine.step()
    assert_pool_idle(engine)


def test_a_request_that_can_start_now_is_admitted_whatever_the_drain_rate():
    """A slow measured rate (long outputs) says the next waiter waits 2 s, beyond max_queue_wait_s; a
    request arriving at an engine with free slots and pages starts at once, so it is admitted."""
    engine = LLMEngine(
        EngineConfig(
            max_num_seqs=2,
            max_queued_requests=-1,
            max_queue_wait_s=1.0,
            new_token_ratio_init=1.0,
            **TINY,
        )
    )
    engine.queue_bounds.drain = drained(per_s=0.5)
    engine.step_time.seconds = 0.1
    engine.add_request("r0", ids(0, 6), greedy(10))
    engine.add_request("r1", ids(1, 6), greedy(10))  # the second slot
    engine.add_request("r2", ids(2, 6), greedy(10))  # waits 1 s as forecast: the shorter estimate
    engine.add_request("r3", ids(3, 6), greedy(10))
    with pytest.raises(EngineOverloaded):
        engine.add_request("r4", ids(4, 6), greedy(10))  # both say longer than 1 s (forecast: 2 s)
    while engine.has_unfinished():
        engine.step()
    assert_pool_idle(engine)


def test_errors_pickle_with_their_fields():
    for error in (
        EngineOverloaded("full", 7, "queue_full"),
        QueueTimeout("late", 3, "queue_timeout"),
        EngineUnavailable("restarting"),
    ):
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and str(back) == str(error)
        assert (back.retry_after_s, back.code) == (error.retry_after_s, error.code)
        assert isinstance(back, EngineUnavailable)


# ---- in the engine ---------------------------------------------------------------------------------


def test_engine_refuses_beyond_the_queue_bound_with_the_measured_rate(monkeypatch):
    monkeypatch.setattr(queue_bounds, "DRAIN_WINDOW_S", 0.05)
    engine = LLMEngine(EngineConfig(max_num_seqs=2, max_queued_requests=8, **TINY))
    for i in range(8):
        engine.add_request(f"r{i}", ids(i, 6), greedy(3))
    with pytest.raises(EngineOverloaded) as info:
        engine.add_request("one-too-many", ids(99, 6), greedy(3))
    assert info.value.retry_after_s == 1 and "one-too-many" not in engine.sequences
    added = 8
    while engine.stats().drain_rate == 0.0:  # keep the queue busy until a rate is measured
        engine.step()
        while len(engine.scheduler.waiting) < 8:
            engine.add_request(f"r{added}", ids(added, 6), greedy(3))
            added += 1
    rate = engine.stats().drain_rate
    with pytest.raises(EngineOverloaded) as info:
        engine.add_request("again", ids(98, 6), greedy(3))
    assert info.value.retry_after_s == max(1, math.ceil(8 / rate))
    assert engine.stats().rejected_total == 2
    while engine.has_unfinished():
        engine.step()
    assert_pool_idle(engine)


def test_a_request_that_waited_too_long_is_dropped_and_holds_nothing():
    engine = LLMEngine(EngineConfig(max_num_seqs=1, queue_timeout_s=0.2, **TINY))
    engine.add_request("runs", ids(1, 30), greedy(40))
    engine.add_request("waits", ids(2, 30), greedy(4))
    engine.add_request("waits-too", ids(3, 30), greedy(4))
    tokens = [t for out in engine.step() + engine.step() for t in out.token_ids]
    assert engine.take_failures() == {}
    time.sleep(0.25)
    tokens += [t for out in engine.step() for t in out.token_ids]
    failures = engine.take_failures()
    assert sorted(failures) == ["waits", "waits-too"]
    for error in failures.values():
        assert (
            isinstance(error, QueueTimeout)
            and error.code == "queue_timeout"
            and error.retry_after_s >= 1
        )
        assert "queue_timeout_s=0.2" in str(error)
    assert set(engine.sequences) == {"runs"} and not engine.scheduler.waiting
    assert engine.stats().queue_timeouts_total == 2
    while engine.has_unfinished():  # the running request is not touched, however long it has been
        tokens += [t for out in engine.step() for t in out.token_ids]
    assert len(tokens) == 40
    assert_pool_idle(engine)


def test_the_running_bound_moves_with_measured_tpot_and_limits_admission():
    """A target no step can meet: the bound falls from max_num_seqs, and no request is admitted
    past the bound in force."""
    engine = LLMEngine(EngineConfig(max_num_seqs=16, **{**TINY, "tpot_slo_ms": 1e-3}))
    engine.running_bound.window_s = 0.05
    for i in range(24):
        engine.add_request(f"r{i}", ids(i, 8), greedy(30))
    while engine.has_unfinished():
        admitted = engine.scheduler.num_admitted
        bound = engine.running_bound.value
        engine.step()
        if engine.scheduler.num_admitted > admitted:
            assert len(engine.scheduler.running) <= bound
    stats = engine.stats()
    assert stats.running_bound < 16 and stats.num_total_pages == 256
    assert engine.running_bound.last_tpot_p90_ms > 0


async def test_async_callers_get_overload_and_timeout_errors():
    engine = AsyncLLMEngine(
        EngineConfig(
            max_num_seqs=1,
            max_queued_requests=1,
            queue_timeout_s=0.3,
            max_queue_wait_s=None,
            **TINY,
        )
    )
    try:
        runs = engine.generate("runs", ids(1, 8), greedy(1500))
        first = await runs.__anext__()  # running: the only slot is taken
        assert first.token_ids
        waits = engine.generate("waits", ids(2, 8), greedy(4))
        waiting = asyncio.ensure_future(waits.__anext__())
        while engine.stats().num_waiting == 0:
            await asyncio.sleep(0.001)
        with pytest.raises(EngineOverloaded) as info:
            async for _ in engine.generate("refused", ids(3, 8), greedy(4)):
                pass
        assert info.value.code == "queue_full"
        with pytest.raises(QueueTimeout):
            await waiting
        await runs.aclose()  # aborts the long request
        deadline = time.monotonic() + 10
        while engine.stats().num_running or engine.stats().num_free_pages != 256:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        stats = engine.stats()
        assert (stats.rejected_total, stats.queue_timeouts_total) == (1, 1)
    finally:
        engine.shutdown()


def test_offline_llm_has_no_queue_bounds_unless_asked():
    llm = LLM(**{k: v for k, v in TINY.items() if k != "tpot_slo_ms"}, max_num_seqs=2)
    config = llm.engine.config
    assert (
        config.max_queued_requests,
        config.max_queue_wait_s,
        config.queue_timeout_s,
        config.tpot_slo_ms,
    ) == (-1, None, None, None)
    outs = llm.generate(
        [ids(i, 5) for i in range(1100)], greedy(1)
    )  # more than the serving default bound
    assert len(outs) == 1100 and all(len(o.token_ids) == 1 for o in outs)
    bounded = LLM(**TINY, max_queued_requests=2)
    with pytest.raises(EngineOverloaded):
        bounded.generate([ids(i, 5) for i in range(3)], greedy(1))
    assert_pool_idle(bounded.engine)  # what was queued before the refusal was taken back
    assert [
        len(o.token_ids) for o in bounded.generate([ids(i, 5) for i in range(2)], greedy(1))
    ] == [1, 1]
