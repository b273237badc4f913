"""AsyncLLMEngine: concurrent streams equal the offline output, and a stream that ends early, is
cancelled or is aborted frees its pages."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest

from edgeacc_ray.config import EngineConfig
from edgeacc_ray.engine import AsyncLLMEngine
from edgeacc_ray.engine.request import SamplingParams
from edgeacc_ray.llm import LLM

ENGINE_ARGS = dict(model="tiny", dtype="float32", num_pages=128, page_size=4)


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, 8000 - 16) for _ in range(n)]


PROMPTS = [ids(1, 1), ids(2, 9), ids(3, 40), ids(4, 17), ids(5, 70)]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def engine():
    eng = AsyncLLMEngine(EngineConfig(**ENGINE_ARGS))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def offline():
    return LLM(**ENGINE_ARGS)


async def collect(
    engine: AsyncLLMEngine, request_id: str, prompt: list[int], params: SamplingParams
) -> list:
    return [chunk async for chunk in engine.generate(request_id, prompt, params)]


async def wait_idle(engine: AsyncLLMEngine, timeout: float = 20.0) -> None:
    """Until nothing runs or waits and every page is free (the engine thread works asynchronously)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        s = engine.stats()
        if s.num_running == 0 and s.num_waiting == 0 and s.num_free_pages == s.num_total_pages:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"engine not idle: {s}")
        await asyncio.sleep(0.01)


async def test_concurrent_streams_equal_offline_output(engine, offline):
    n = 12
    expected = offline.generate(PROMPTS, greedy(n, logprobs=1))
    results = await asyncio.gather(
        *(collect(engine, f"c{i}", p, greedy(n, logprobs=1)) for i, p in enumerate(PROMPTS))
    )
    for chunks, ref in zip(results, expected):
        assert all(c.token_ids for c in chunks)  # stream_interval 1: never an empty chunk
        assert [c.finished for c in chunks] == [False] * (len(chunks) - 1) + [True]
        assert chunks[-1].finish_reason == "length"
        assert [t for c in chunks for t in c.token_ids] == ref.token_ids
        assert "".join(c.text for c in chunks) == ref.text
        assert [lp.token_id for c in chunks for lp in c.logprobs] == ref.token_ids
        assert [c.num_output_tokens for c in chunks] == list(
            itertools.accumulate(len(c.token_ids) for c in chunks)
        )
    await wait_idle(engine)


async def test_seeded_sampling_equals_offline(engine, offline):
    params = SamplingParams(temperature=1.0, seed=9, max_tokens=10, ignore_eos=True)
    [ref] = offline.generate(PROMPTS[2], params)
    chunks = await collect(engine, "seeded", PROMPTS[2], params)
    assert [t for c in chunks for t in c.token_ids] == ref.token_ids


async def test_closing_the_stream_early_aborts_and_frees_pages(engine):
    before = engine.stats().requests_aborted_total
    stream = engine.generate("early", PROMPTS[4], greedy(500))
    got = [await stream.__anext__(), await stream.__anext__()]
    assert not got[-1].finished and engine.stats().num_free_pages < engine.stats().num_total_pages
    await stream.aclose()
    await wait_idle(engine)
    assert engine.stats().requests_aborted_total == before + 1
    chunks = await collect(engine, "early", PROMPTS[4], greedy(3))  # the id is free again
    assert chunks[-1].finished and sum(len(c.token_ids) for c in chunks) == 3


async def test_break_out_of_async_for_aborts(engine):
    before = engine.stats().requests_aborted_total

    async def consume() -> int:
        count = 0
        async for chunk in engine.generate("brk", PROMPTS[3], greedy(500)):
            count += len(chunk.token_ids)
            if count >= 3:
                break
        return count

    assert await consume() >= 3
    await asyncio.sleep(0)  # let the abandoned generator be finalized
    await wait_idle(engine)
    assert engine.stats().requests_aborted_total == before + 1


async def test_cancelled_consumer_aborts_and_frees_pages(engine):
    before = engine.stats().requests_aborted_total
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate("cancel", PROMPTS[2], greedy(500)):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 20)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_idle(engine)
    assert engine.stats().requests_aborted_total == before + 1


async def test_abort_while_waiting_for_the_first_chunk(engine):
    """Abort before the request produced anything: it must never start or must be cleaned up."""
    stream = engine.generate("w", PROMPTS[4], greedy(500))
    first = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await stream.aclose()
    await wait_idle(engine)


async def test_explicit_abort_ends_the_stream(engine):
    """engine.abort(request_id) (e.g. from a disconnect handler) must end the request's stream with
    a final chunk (finish_reason "abort"), not leave its consumer waiting forever."""
    stream = engine.generate("ext", PROMPTS[3], greedy(500))
    first = await stream.__anext__()
    assert not first.finished
    engine.abort("ext")
    rest = []
    try:
        async with asyncio.timeout(5):
            async for chunk in stream:
                rest.append(chunk)
    except TimeoutError:
        await stream.aclose()
        pytest.fail("the stream of an aborted request never ended")
    assert rest and rest[-1].finished and rest[-1].finish_reason == "abort"
    await wait_idle(engine)


async def test_bad_requests_raise_and_engine_stays_usable(engine, offline):
    with pytest.raises(ValueError, match="empty"):
        await collect(engine, "bad", [], greedy(3))
    with pytest.raises(ValueError, match="temperature"):
        await collect(engine, "bad", PROMPTS[1], SamplingParams(temperature=-1.0))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        await collect(engine, "bad", [1, 8000], greedy(3))
    stream = engine.generate("dup", PROMPTS[4], greedy(50))
    await stream.__anext__()
    with pytest.raises(ValueError, match="already"):
        await collect(engine, "dup", PROMPTS[1], greedy(3))
    await stream.aclose()
    [ref] = offline.generate(PROMPTS[1], greedy(4))
    chunks = await collect(engine, "good", PROMPTS[1], greedy(4))
    assert [t for c in chunks for t in c.token_ids] == ref.token_ids
    await wait_idle(engine)


async def test_stream_interval_merges_chunks(offline):
    eng = AsyncLLMEngine(EngineConfig(**ENGINE_ARGS, stream_interval=4))
    try:
        chunks = await collect(eng, "si", PROMPTS[2], greedy(10))
    finally:
        eng.shutdown()
    [ref] = offline.generate(PROMPTS[2], greedy(10))
    assert len(chunks[0].token_ids) == 1  # the first token leaves at once (TTFT does not wait)
    assert all(len(c.token_ids) >= 4 for c in chunks[1:-1])
    assert [t for c in chunks for t in c.token_ids] == ref.token_ids
    assert "".join(c.text for c in chunks) == ref.text
