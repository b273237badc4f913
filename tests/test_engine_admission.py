"""Admission by KV reservation: with every output reserved (ratio 1.0) a tiny pool serves many
requests without ever running short or preempting, shared prefix pages count once; with optimistic
reservations the pool runs short, but no step retracts more than its allowance and greedy outputs
still equal the reference; a request that can never fit is refused at once, saying why."""

from __future__ import annotations

import random

import pytest

from edgeacc_ray.config import EngineConfig, SemiPDConfig
from edgeacc_ray.engine import LLMEngine
from edgeacc_ray.engine.request import InvalidRequest, SamplingParams, Sequence
from edgeacc_ray.engine.scheduling import AdmissionPolicy, RunningBound
from edgeacc_ray.llm import LLM
from tests.test_engine_pages import assert_pool_idle

PESSIMISTIC = dict(new_token_ratio_init=1.0, new_token_ratio_min=1.0, reservation_clip_tokens=None)
OPTIMISTIC = dict(new_token_ratio_init=0.1, new_token_ratio_min=0.1)
FP32 = dict(model="tiny", dtype="float32", page_size=4, tpot_slo_ms=None)


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, 8000 - 16) for _ in range(n)]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def workload(num: int) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(7)
    return [(ids(100 + i, rng.randrange(3, 21)), greedy(rng.randrange(4, 25))) for i in range(num)]


@pytest.fixture(scope="module")
def reference() -> dict[tuple, list[int]]:
    """Greedy outputs of the workloads below on a pool where nothing ever waits for pages."""
    llm = LLM(num_pages=1024, **FP32)
    jobs = workload(48) + [(ids(300 + i, 4), greedy(24)) for i in range(40)]
    outs = llm.generate([p for p, _ in jobs], [s for _, s in jobs])
    return {(tuple(p), s.max_tokens): o.token_ids for (p, s), o in zip(jobs, outs)}


def run_checked(engine: LLMEngine, jobs, check_step) -> dict[str, list[int]]:
    """Add every job, step until done calling check_step(engine, running_before, retracted) after each
    step; the tokens each request produced."""
    for i, (prompt, params) in enumerate(jobs):
        engine.add_request(f"r{i}", prompt, params)
    tokens: dict[str, list[int]] = {}
    for _ in range(5000):
        if not engine.has_unfinished():
            return tokens
        before, retractions = len(engine.scheduler.running), engine.scheduler.num_preemptions
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
        check_step(engine, before, engine.scheduler.num_preemptions - retractions)
    raise AssertionError("the engine did not finish")


def test_full_reservations_never_run_short(reference):
    """48 requests on 40 pages of 4 tokens: they wait for room, and none is ever preempted."""
    engine = LLMEngine(EngineConfig(num_pages=40, **FP32, **PESSIMISTIC))
    jobs = workload(48)
    seen = dict(waiting=0, running=0)

    def check(engine: LLMEngine, _before: int, retracted: int) -> None:
        sched, bm = engine.scheduler, engine.block_manager
        assert retracted == 0
        assert (
            sched.committed_pages() <= bm.num_free_pages
        )  # what the running may still take is there
        seen["waiting"] = max(seen["waiting"], len(sched.waiting))
        seen["running"] = max(seen["running"], len(sched.running))

    tokens = run_checked(engine, jobs, check)
    assert (
        seen["waiting"] > 20 and seen["running"] > 3
    )  # the pool, not the batch, held requests back
    assert engine.stats().retractions_total == 0
    for i, (prompt, params) in enumerate(jobs):
        assert tokens[f"r{i}"] == reference[(tuple(prompt), params.max_tokens)]
    assert_pool_idle(engine)


def test_shared_prefix_pages_count_once():
    """Six requests on one cached 64-token prefix reserve 16 shared pages + 3 each: all run at once in
    40 pages, where counting the prefix per request (19 pages each) would admit two."""
    engine = LLMEngine(EngineConfig(num_pages=40, **FP32, **PESSIMISTIC))
    prefix = ids(9, 64)
    engine.add_request("warm", prefix + [5], greedy(1))
    while engine.has_unfinished():
        engine.step()
    for i in range(6):
        engine.add_request(f"s{i}", prefix + ids(20 + i, 4), greedy(8))
    engine.step()
    assert len(engine.scheduler.running) == 6 and not engine.scheduler.waiting
    stats = engine.stats()
    assert stats.reserved_pages == 16 + 6 * 3 <= stats.num_total_pages
    while engine.has_unfinished():
        engine.step()
    assert engine.scheduler.num_preemptions == 0
    assert_pool_idle(engine)


def test_optimistic_reservations_retract_boundedly_and_outputs_stay_equal(reference):
    """40 requests reserving a tenth of their 24 tokens on 80 pages: the pool runs short; each step
    retracts at most max(1, running/16), newest first, and every output equals the reference."""
    engine = LLMEngine(EngineConfig(num_pages=80, **FP32, **OPTIMISTIC))
    jobs = [(ids(300 + i, 4), greedy(24)) for i in range(40)]
    steps_retracting = []

    def check(engine: LLMEngine, before: int, retracted: int) -> None:
        assert retracted <= max(1, before // 16)
        if retracted:
            steps_retracting.append(retracted)

    tokens = run_checked(engine, jobs, check)
    assert max(steps_retracting) >= 2  # a large batch may lose more than one sequence per step ...
    assert len(steps_retracting) >= 3  # ... and the pool ran short more than once
    assert engine.stats().retractions_total == sum(steps_retracting)
    assert engine.stats().new_token_ratio > 0.1  # retractions raised the reservations
    for i, (prompt, params) in enumerate(jobs):
        assert tokens[f"r{i}"] == reference[(tuple(prompt), params.max_tokens)]
    assert_pool_idle(engine)


def test_semi_pd_reserves_before_prefill():
    """Semi-PD: admission into the prefill process takes the same reservations (prompt pages at once,
    output reserved), so a tiny shared pool never runs short either; outputs equal the colocated engine."""
    jobs = workload(16)
    prompts, params = [p for p, _ in jobs], [s for _, s in jobs]
    args = dict(
        num_pages=24, dtype="float32", page_size=4, max_num_batched_tokens=96, **PESSIMISTIC
    )
    with LLM("tiny", **args) as colocated:
        expected = colocated.generate(prompts, params)
    with LLM("tiny", semi_pd=SemiPDConfig(prefill_batch_tokens=64), **args) as llm:
        got = llm.generate(prompts, params)
        assert llm.engine.scheduler.num_preemptions == 0
        assert llm.engine.scheduler.num_admitted == len(jobs)
        assert_pool_idle(llm.engine)
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]


def test_a_request_that_can_never_fit_is_refused_at_once():
    """8 pages of 4 tokens cap the context at 32: a longer prompt is refused on arrival with the
    reason, nothing is queued; a prompt that leaves room runs and stops at the pool's end."""
    engine = LLMEngine(EngineConfig(num_pages=8, **FP32))
    assert engine.max_model_len == 32
    with pytest.raises(InvalidRequest) as info:
        engine.add_request("big", ids(1, 40), greedy(4))
    assert info.value.code == "exceeds_kv_capacity" and info.value.field == "prompt"
    assert "KV cache holds 32 tokens" in str(info.value) and "40 tokens" in str(info.value)
    assert not engine.has_unfinished() and not engine.sequences
    engine.add_request("fits", ids(2, 30), greedy(100))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 2


def test_the_ratio_follows_finished_requests_and_rises_after_retraction():
    policy = AdmissionPolicy(
        page_size=4,
        max_model_len=1000,
        bound=RunningBound(8, None),
        ratio_init=0.7,
        ratio_min=0.2,
        clip_tokens=50,
    )
    short = Sequence("s", [1, 2, 3], greedy(100), arrival_time=0.0)
    short.token_ids += [4] * 5  # stopped after 5 of (clipped) 50 tokens: used 0.1
    assert policy.reserved_tokens(short) == 8 + 35 - 1  # 0.7 of the 95 left, clipped to 50
    for _ in range(50):
        policy.finished(short)
    assert policy.ratio == pytest.approx(0.2)  # toward 0.1, held at the floor
    policy.retracted()
    assert policy.ratio == pytest.approx(0.3)
    full = Sequence("f", [1, 2, 3], greedy(10), arrival_time=0.0)
    full.token_ids += [4] * 10
    for _ in range(100):
        policy.finished(full)
    assert policy.ratio == pytest.approx(1.0, abs=1e-3)
    for _ in range(20):
        policy.retracted()
    assert policy.ratio == 1.0
