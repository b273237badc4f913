"""KV page accounting of the native engine: every page comes back after completion and abort, the
prefix cache reports the right hits, flush empties it, and LRU eviction keeps allocation going."""

from __future__ import annotations

import random

import pytest

from edgeacc_ray.config import EngineConfig
from edgeacc_ray.engine import LLMEngine
from edgeacc_ray.engine.request import SamplingParams, SequenceStatus
from edgeacc_ray.llm import LLM

VOCAB = 8000


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, VOCAB - 16) for _ in range(n)]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def assert_pool_idle(engine: LLMEngine) -> None:
    bm = engine.block_manager
    stats = engine.stats()
    assert not engine.sequences and not engine.has_unfinished()
    assert (stats.num_running, stats.num_waiting) == (0, 0)
    assert stats.num_free_pages == stats.num_total_pages == bm.num_pages
    assert sum(bm.ref_count) == 0
    # each page exactly once in free + evictable: no leak, no double free
    assert sorted(list(bm.free_pages) + list(bm.evictable)) == list(range(bm.num_pages))


def drain(
    engine: LLMEngine, chunks: dict[str, list] | None = None, max_steps: int = 10_000
) -> dict[str, list]:
    """Step until idle; the chunks each request received (added to `chunks` when given)."""
    chunks = {} if chunks is None else chunks
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return chunks
        for out in engine.step():
            chunks.setdefault(out.request_id, []).append(out)
    raise AssertionError("engine did not finish")


def make_engine(**kwargs) -> LLMEngine:
    args = dict(model="tiny", dtype="float32", num_pages=256)
    args.update(kwargs)
    return LLMEngine(EngineConfig(**args))


# ---- completion and abort -------------------------------------------------------------------------


def test_pages_return_after_completion():
    engine = make_engine(page_size=4)
    for i, n in enumerate([1, 3, 4, 5, 40]):
        engine.add_request(f"r{i}", ids(i, n), greedy(6))
    chunks = {out.request_id: [out] for out in engine.step()}
    assert engine.stats().num_free_pages < engine.block_manager.num_pages
    chunks = drain(engine, chunks)
    assert sorted(chunks) == [f"r{i}" for i in range(5)]
    for outs in chunks.values():
        assert [o.finished for o in outs] == [False] * 5 + [True]
        assert outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 6
    stats = engine.stats()
    assert stats.requests_finished_total == 5 and stats.requests_aborted_total == 0
    assert stats.generation_tokens_total == 30
    assert stats.prompt_tokens_total == 1 + 3 + 4 + 5 + 40
    assert_pool_idle(engine)


def test_max_num_seqs_bounds_the_running_batch():
    engine = make_engine(max_num_seqs=2, page_size=4)
    for i in range(5):
        engine.add_request(f"r{i}", ids(100 + i, 6), greedy(4))
    finished = 0
    while engine.has_unfinished():
        finished += sum(o.finished for o in engine.step())
        stats = engine.stats()
        assert stats.num_running <= 2 and stats.num_running + stats.num_waiting == 5 - finished
    assert finished == 5
    assert_pool_idle(engine)


def test_identical_prompts_in_one_batch():
    """The same prompt several times in one step: every copy computes its own pages, one of them is
    cached, and each page is released exactly once."""
    llm = LLM("tiny", dtype="float32", num_pages=128, page_size=4)
    prompt = ids(110, 30)
    outs = llm.generate([prompt] * 4, greedy(6))
    assert len({tuple(o.token_ids) for o in outs}) == 1
    assert_pool_idle(llm.engine)
    again = llm.generate([prompt] * 2, greedy(6))
    assert [o.num_cached_tokens for o in again] == [28, 28]
    assert again[0].token_ids == outs[0].token_ids
    assert_pool_idle(llm.engine)


def test_abort_waiting_and_running_requests():
    engine = make_engine(max_num_seqs=1, page_size=4)
    engine.add_request("running", ids(1, 30), greedy(50))
    engine.add_request("waiting", ids(2, 30), greedy(50))
    engine.add_request("survivor", ids(3, 10), greedy(3))
    for _ in range(3):
        engine.step()
    seqs = engine.sequences
    assert seqs["running"].status == SequenceStatus.RUNNING and seqs["running"].page_table
    assert seqs["waiting"].status == SequenceStatus.WAITING and not seqs["waiting"].page_table
    assert engine.stats().num_waiting == 2

    out = engine.abort("waiting")
    assert out is not None and out.finished and out.finish_reason == "abort" and out.token_ids == []
    assert engine.stats().num_waiting == 1

    running = seqs["running"]
    out = engine.abort("running")
    assert out.finished and out.finish_reason == "abort" and out.num_output_tokens == 3
    assert running.page_table == [] and running.status == SequenceStatus.FINISHED
    assert engine.stats().num_running == 0
    assert engine.abort("running") is None and engine.abort("never-added") is None

    chunks = drain(engine)
    assert list(chunks) == ["survivor"]  # aborted requests produce nothing more
    assert chunks["survivor"][-1].finish_reason == "length"
    assert engine.abort("survivor") is None  # finished: unknown now
    stats = engine.stats()
    assert stats.requests_aborted_total == 2 and stats.requests_finished_total == 1
    assert_pool_idle(engine)


def test_abort_during_chunked_prefill_and_reuse_of_request_id():
    engine = make_engine(page_size=4, max_num_batched_tokens=8)
    engine.add_request("a", ids(5, 60), greedy(4))
    engine.step()
    seq = engine.sequences["a"]
    assert seq.status == SequenceStatus.RUNNING and 0 < seq.num_computed_tokens < 60
    assert engine.abort("a").finish_reason == "abort"
    assert_pool_idle(engine)
    engine.add_request("a", ids(5, 60), greedy(4))  # a finished id may be used again
    chunks = drain(engine)
    assert chunks["a"][-1].num_output_tokens == 4
    assert_pool_idle(engine)


def test_abort_everything_mid_flight():
    engine = make_engine(num_pages=24, page_size=4)
    for i in range(6):
        engine.add_request(f"r{i}", ids(10 + i, 12 + 3 * i), greedy(40))
    for _ in range(15):
        engine.step()
    assert engine.scheduler.num_preemptions > 0 or engine.stats().num_waiting > 0
    for i in range(6):
        assert engine.abort(f"r{i}") is not None
    assert engine.step() == []
    assert engine.stats().requests_aborted_total == 6
    assert_pool_idle(engine)


def test_abort_flushes_held_back_text():
    """Text held back for a possible stop string is handed out when the request is aborted."""
    engine = make_engine()
    prompt = ids(7, 20)
    engine.add_request("ref", prompt, greedy(6))
    ref = "".join(o.text for o in drain(engine)["ref"])
    assert len(ref) >= 4
    engine.add_request(
        "held",
        prompt,
        SamplingParams(
            temperature=0.0, max_tokens=50, ignore_eos=True, stop=["\x00\x01 never appears here"]
        ),
    )
    streamed = ""
    for _ in range(6):
        streamed += "".join(o.text for o in engine.step())
    streamed += engine.abort("held").text
    assert streamed == ref
    assert_pool_idle(engine)


# ---- prefix cache -----------------------------------------------------------------------------------


def test_prefix_cache_counts_full_pages_of_shared_prefix():
    llm = LLM("tiny", dtype="float32", num_pages=256, page_size=16)
    engine = llm.engine
    prefix = ids(20, 50)  # 3 full pages (48 tokens) + 2
    [first] = llm.generate(prefix + ids(21, 10), greedy(2))
    assert first.num_cached_tokens == 0
    assert engine.stats().cached_prompt_tokens_total == 0
    outs = llm.generate(
        [prefix + ids(22, 10), prefix + ids(23, 30), prefix[:48] + ids(24, 1)], greedy(2)
    )
    assert [o.num_cached_tokens for o in outs] == [48, 48, 48]
    stats = engine.stats()
    assert stats.cached_prompt_tokens_total == 3 * 48
    assert stats.prompt_tokens_total == 60 + 60 + 80 + 49
    assert stats.cache_hit_rate == pytest.approx(144 / 249)
    assert stats.num_cached_pages > 0
    assert_pool_idle(engine)


def test_prefix_cache_never_serves_the_whole_prompt():
    llm = LLM("tiny", dtype="float32", num_pages=256, page_size=16)
    prompt = ids(30, 64)  # exactly 4 pages
    [a] = llm.generate(prompt, greedy(3))
    [b] = llm.generate(prompt, greedy(3))
    assert a.num_cached_tokens == 0
    assert (
        b.num_cached_tokens == 48
    )  # the last page holds the last prompt token, which must be computed
    assert a.token_ids == b.token_ids
    [c] = llm.generate(prompt[:16], greedy(3))  # one page: nothing may be served from the cache
    assert c.num_cached_tokens == 0
    [d] = llm.generate(prompt[:17], greedy(3))
    assert d.num_cached_tokens == 16
    assert_pool_idle(llm.engine)


def test_generated_tokens_are_cached_too():
    """Pages filled during decode are keyed like prompt pages: a follow-up turn that repeats the
    prompt and the reply hits them."""
    llm = LLM("tiny", dtype="float32", num_pages=256, page_size=8)
    prompt = ids(31, 20)
    [a] = llm.generate(prompt, greedy(20))
    follow = prompt + a.token_ids + ids(32, 5)
    [b] = llm.generate(follow, greedy(2))
    computed = len(prompt) + len(a.token_ids) - 1  # the last sampled token was never computed
    assert b.num_cached_tokens == computed // 8 * 8 == 32


def test_prefix_caching_disabled():
    llm = LLM("tiny", dtype="float32", num_pages=256, enable_prefix_caching=False)
    prompt = ids(33, 70)
    [a] = llm.generate(prompt, greedy(3))
    [b] = llm.generate(prompt, greedy(3))
    assert a.num_cached_tokens == b.num_cached_tokens == 0 and a.token_ids == b.token_ids
    assert llm.engine.stats().num_cached_pages == 0
    assert_pool_idle(llm.engine)


def test_flush_cache_empties_the_cache():
    llm = LLM("tiny", dtype="float32", num_pages=256)
    prompt = ids(40, 70)
    [a] = llm.generate(prompt, greedy(3))
    [b] = llm.generate(prompt, greedy(3))
    assert b.num_cached_tokens == 64
    assert llm.engine.stats().num_cached_pages > 0
    assert llm.engine.flush_cache() is True
    assert llm.engine.stats().num_cached_pages == 0
    assert not llm.engine.block_manager.page_of_key
    assert_pool_idle(llm.engine)
    [c] = llm.generate(prompt, greedy(3))
    assert c.num_cached_tokens == 0
    assert a.token_ids == b.token_ids == c.token_ids


def test_flush_keeps_pages_of_running_sequences():
    engine = make_engine(page_size=4)
    prompt = ids(41, 30)
    engine.add_request("a", prompt, greedy(10))
    chunks = {"a": engine.step() + engine.step()}
    engine.flush_cache()  # must not hand out pages that "a" still holds
    engine.add_request("b", ids(42, 30), greedy(10))
    chunks = drain(engine, chunks)
    engine.add_request("c", prompt, greedy(10))
    out_c = drain(engine)["c"]
    assert [t for o in chunks["a"] for t in o.token_ids] == [t for o in out_c for t in o.token_ids]
    assert_pool_idle(engine)


def test_lru_eviction_drops_least_recently_used_prefixes():
    """Six 16-token prompts fill a 24-page pool (4 pages each) with cached pages; a seventh must
    evict, and it takes the least recently used prompt's pages."""
    llm = LLM("tiny", dtype="float32", num_pages=24, page_size=4)
    engine = llm.engine
    prompts = [ids(50 + i, 16) for i in range(7)]
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    first = {}
    for i in range(6):
        [out] = llm.generate(prompts[i], one)
        first[i] = out.token_ids
    assert engine.stats().num_cached_pages == 24 and len(engine.block_manager.free_pages) == 0
    [g] = llm.generate(prompts[6], one)  # allocation succeeds by evicting
    assert g.finish_reason == "length"
    [b] = llm.generate(prompts[1], one)  # recently used: still cached
    assert b.num_cached_tokens == 12 and b.token_ids == first[1]
    [a] = llm.generate(prompts[0], one)  # least recently used: evicted
    assert a.num_cached_tokens == 0 and a.token_ids == first[0]
    [b2] = llm.generate(prompts[1], one)  # touched again just now, survives re-evictions
    assert b2.num_cached_tokens == 12
    assert_pool_idle(engine)


def test_allocation_succeeds_when_pool_is_all_cached():
    """A pool full of cached pages still admits a request that needs every page."""
    llm = LLM("tiny", dtype="float32", num_pages=16, page_size=4)
    for i in range(4):
        llm.generate(ids(60 + i, 15), greedy(1))
    assert llm.engine.stats().num_cached_pages > 8
    [out] = llm.generate(ids(70, 40), greedy(24))  # 64 tokens: all 16 pages
    assert out.finish_reason == "length" and len(out.token_ids) == 24
    assert_pool_idle(llm.engine)


def test_kv_usage_counts_cached_pages_as_free():
    """EngineStats.kv_usage is the fraction of pages held by live sequences, in [0, 1]; cached but
    unreferenced pages count as free (they are already inside num_free_pages)."""
    llm = LLM("tiny", dtype="float32", num_pages=64, page_size=4)
    llm.generate(ids(90, 30), greedy(4))
    stats = llm.engine.stats()
    assert stats.num_cached_pages > 0 and stats.num_free_pages == 64
    assert stats.kv_usage == 0.0
    engine = llm.engine
    engine.add_request("live", ids(91, 30), greedy(4))
    engine.step()
    held = len(engine.sequences["live"].page_table)
    assert engine.stats().kv_usage == pytest.approx(held / 64)


def test_output_stops_at_max_model_len():
    llm = LLM("tiny", dtype="float32", num_pages=8, page_size=4)  # context 32 tokens
    assert llm.engine.max_model_len == 32
    [out] = llm.generate(ids(80, 20), greedy(100))
    assert out.finish_reason == "length" and len(out.token_ids) == 12
    assert_pool_idle(llm.engine)
