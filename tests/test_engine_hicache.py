"""The native engine with the KV offload tier (enable_hierarchical_cache) on a real Ray cluster: a page
is written at its first reuse, never when used once; reused prompts whose pages were evicted from a tiny
device pool come back from the tier, and their greedy output still equals HF transformers token for
token (fp32), also under retraction and with Semi-PD; a second engine (another replica) reuses the first
one's pages; loaded pages are never written back; a request aborted while its prefix loads returns its
pages; the counters reach /metrics; the settings and ENABLE_EDGE_ACC."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import uuid

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from edgeacc_ray.config import ConfigError, EngineConfig, SemiPDConfig, ServeConfig
from edgeacc_ray.engine import AsyncLLMEngine
from edgeacc_ray.engine.request import SamplingParams, SequenceStatus
from edgeacc_ray.http.metrics import render
from edgeacc_ray.llm import LLM
from kv_store.store_actor import STORE_NAMESPACE
from tests.test_engine_correctness import OPTIMISTIC, assert_pool_idle

VOCAB = 8000
PAGE = 4
NEW_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def random_ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, VOCAB - 16) for _ in range(n)]


@pytest.fixture(scope="module")
def hf_greedy(tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0, bos_token_id=None)

    def run(prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
        ids = torch.tensor([prompt])
        config.max_new_tokens = config.min_new_tokens = n
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        return out[0, len(prompt) :].tolist()

    return run


@pytest.fixture
def store(ray_cluster):
    """A tier store of this test's own (the node's store is shared by the whole session), killed after."""
    name = f"test-hicache-{uuid.uuid4().hex[:8]}"
    yield name
    try:
        ray_cluster.kill(ray_cluster.get_actor(name, namespace=STORE_NAMESPACE), no_restart=True)
    except ValueError:
        pass


def tiered(store: str, **kwargs) -> LLM:
    args = dict(
        dtype="float32",
        page_size=PAGE,
        num_pages=40,
        enable_hierarchical_cache=True,
        kv_store_name=store,
        kv_cache_offload_memory_gb=0.05,
    )
    args.update(kwargs)
    return LLM("tiny", **args)


def settle(llm: LLM) -> None:
    """Wait until the pages queued for the tier are in the store (writes are asynchronous)."""
    assert llm.engine.tier.client.flush(30)


def use_twice(llm: LLM, batch: list[list[int]], params: SamplingParams = GREEDY) -> list:
    """Run each prompt twice in a row: the second run reuses its pages from the device pool, which
    sends them to the tier (a page used once never goes there). Returns the first runs' outputs."""
    first = []
    for prompt in batch:
        first += llm.generate([prompt], params)
        llm.generate([prompt], params)
    settle(llm)
    return first


def prompts() -> list[list[int]]:
    """Six prompts of 41..76 tokens: about 100 pages in all, the pool holds 40."""
    return [random_ids(100 + i, 41 + 7 * i) for i in range(6)]


def test_prompts_evicted_from_the_pool_come_back_from_the_tier_and_equal_hf(store, hf_greedy):
    batch = prompts()
    llm = tiered(store)
    first = use_twice(llm, batch)
    assert sum(o.num_cached_tokens for o in first) == 0
    before = llm.engine.stats()
    again = llm.generate(batch, GREEDY)
    for prompt, a, b in zip(batch, first, again):
        assert a.token_ids == b.token_ids == hf_greedy(prompt), len(prompt)
        assert (
            b.num_cached_tokens >= (len(prompt) - 1) // PAGE * PAGE - PAGE
        )  # all but the last page or two
    stats = llm.engine.stats()
    host = stats.host_cached_prompt_tokens_total - before.host_cached_prompt_tokens_total
    cached = stats.cached_prompt_tokens_total - before.cached_prompt_tokens_total
    assert host > 0.5 * cached  # the pool kept little
    assert cached == sum(o.num_cached_tokens for o in again)
    assert stats.hicache.pages_loaded_total * PAGE >= stats.host_cached_prompt_tokens_total
    assert stats.hicache.pages_written_total > 0 and stats.hicache.loads_total > len(batch)
    assert_pool_idle(llm)
    llm.close()


def test_a_page_used_once_is_not_written_a_reused_one_is_once_and_loaded_pages_never_go_back(store):
    batch = prompts()
    llm = tiered(
        store, new_token_ratio_init=1.0, new_token_ratio_min=1.0
    )  # whole reservations: no retraction
    llm.generate(batch, GREEDY)
    settle(llm)
    assert (
        llm.engine.stats().hicache.pages_written_total == 0
    )  # random prompts, each seen once: nothing stored
    reused = 0
    for prompt in (
        batch
    ):  # each twice more: the first repeat's full prompt pages come from the pool and go on
        llm.generate(
            [prompt], GREEDY
        )  # (evicted since round one by the other prompts: computed, used once)
        [out] = llm.generate([prompt], GREEDY)
        assert out.num_cached_tokens == (len(prompt) - 1) // PAGE * PAGE
        reused += out.num_cached_tokens // PAGE
        llm.generate([prompt], GREEDY)  # another use sends nothing more
    settle(llm)
    written = llm.engine.stats().hicache.pages_written_total
    assert written == reused
    llm.engine.flush_cache()  # the next prefixes come from the tier only
    again = llm.generate(batch, GREEDY)
    assert (
        sum(o.num_cached_tokens for o in again)
        == llm.engine.stats().host_cached_prompt_tokens_total
        > 0
    )
    settle(llm)
    assert (
        llm.engine.stats().hicache.pages_written_total == written
    )  # loaded pages are never sent back
    llm.close()


def test_second_engine_continues_the_conversation_from_the_tier(store, hf_greedy):
    """Two engines in one process share the node's store, as two replicas on a node do: the first
    answers turn one, the second gets turn two (history + answer + a new message) cold."""
    turn1 = random_ids(7, 61)
    first = tiered(store)
    [answer] = first.generate([turn1], GREEDY)
    history = turn1 + answer.token_ids
    first.generate(
        [history], SamplingParams(temperature=0.0, max_tokens=1)
    )  # the history reused: stored
    first.close()  # sends what it queued
    turn2 = history + random_ids(8, 13)
    second = tiered(store)
    [reply] = second.generate([turn2], GREEDY)
    assert reply.token_ids == hf_greedy(turn2)
    stats = second.engine.stats()
    history_pages = (len(turn1) + NEW_TOKENS - 1) // PAGE  # all that the first engine computed
    assert reply.num_cached_tokens == stats.host_cached_prompt_tokens_total == history_pages * PAGE
    second.close()


def test_retraction_with_the_tier_equals_hf(store, hf_greedy):
    """Optimistic reservations in a tiny pool retract running sequences; they come back through the
    device prefix cache or the tier, and every output still equals HF."""
    batch = [random_ids(30 + i, 20 + 9 * i) for i in range(5)]
    n = 30
    llm = tiered(store, num_pages=24, **OPTIMISTIC)
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    use_twice(llm, batch, params)
    outputs = llm.generate(batch, params)
    assert (
        llm.engine.scheduler.num_preemptions > 0
        and llm.engine.stats().host_cached_prompt_tokens_total > 0
    )
    for prompt, out in zip(batch, outputs):
        assert out.token_ids == hf_greedy(prompt, n), len(prompt)
        assert out.num_cached_tokens <= len(prompt) - 1
    assert_pool_idle(llm)
    llm.close()


def test_semi_pd_decode_side_loads_from_the_tier(store, hf_greedy):
    batch = prompts()[:4]
    llm = tiered(store, num_pages=48, semi_pd=SemiPDConfig(prefill_batch_tokens=64))
    try:
        use_twice(llm, batch)
        again = llm.generate(batch, GREEDY)
        for prompt, out in zip(batch, again):
            assert out.token_ids == hf_greedy(prompt), len(prompt)
        assert llm.engine.stats().host_cached_prompt_tokens_total > 0
        assert_pool_idle(llm)
    finally:
        llm.close()


def test_loading_request_counts_as_admitted_and_returns_its_pages_on_abort(store):
    prompt = random_ids(50, 60)
    llm = tiered(store, max_num_seqs=1)
    use_twice(llm, [prompt])
    engine = llm.engine
    engine.flush_cache()  # the device forgets: the prefix is only in the tier now
    engine.add_request("loading", prompt, GREEDY)
    engine.add_request("behind", random_ids(51, 9), GREEDY)
    engine.step()
    seq = engine.sequences["loading"]
    assert seq.status == SequenceStatus.LOADING and engine.stats().num_loading == 1
    assert (
        engine.sequences["behind"].status == SequenceStatus.WAITING
    )  # the running bound (1) is taken
    assert engine.scheduler.blocked  # so the loop may sleep until the read is back
    assert engine.abort("loading").finish_reason == "abort"
    while engine.has_unfinished():
        if engine.waiting_on_io():
            engine.wait_io()
        engine.step()
    assert_pool_idle(llm)
    llm.close()


def test_async_engine_wakes_when_a_read_comes_back(store, hf_greedy):
    """The serving loop sleeps while only tier reads are out, and a read coming back wakes it."""
    config = EngineConfig(
        model="tiny",
        dtype="float32",
        page_size=PAGE,
        num_pages=40,
        enable_hierarchical_cache=True,
        kv_store_name=store,
        kv_cache_offload_memory_gb=0.05,
    )
    prompt = random_ids(60, 57)
    engine = AsyncLLMEngine(config)

    async def run(request_id: str) -> list:
        return [c async for c in engine.generate(request_id, prompt, GREEDY)]

    try:
        asyncio.run(asyncio.wait_for(run("cold"), 60))
        asyncio.run(asyncio.wait_for(run("reused"), 60))  # the second use sends the prompt's pages
        assert engine.engine.tier.client.flush(30)
        engine.flush_cache()
        chunks = asyncio.run(asyncio.wait_for(run("from-tier"), 60))
        assert [t for c in chunks for t in c.token_ids] == hf_greedy(prompt)
        assert chunks[-1].num_cached_tokens == engine.stats().host_cached_prompt_tokens_total == 56
    finally:
        engine.shutdown()


def test_tier_counters_reach_metrics(store):
    batch = prompts()[:3]
    llm = tiered(store)
    use_twice(llm, batch)
    llm.engine.flush_cache()
    llm.generate(batch, GREEDY)
    stats = llm.engine.stats()
    text = render("tiny", stats, 0).decode()
    host, device = stats.host_cached_prompt_tokens_total, stats.device_cached_prompt_tokens_total
    assert host > 0 and host + device == stats.cached_prompt_tokens_total
    label = '{model_name="tiny"}'
    assert f"edgeacc:host_cached_tokens_total{label} {float(host)}" in text
    assert f"edgeacc:device_cached_tokens_total{label} {float(device)}" in text
    assert (
        f"sglang:load_back_tokens_total{label} {float(stats.hicache.pages_loaded_total * PAGE)}"
        in text
    )
    assert f"sglang:cache_hit_rate{label} {stats.cache_hit_rate}" in text
    for name in (
        "sglang:backuped_tokens_total",
        "sglang:hicache_host_used_tokens",
        "edgeacc:hicache_loads_total",
        "edgeacc:hicache_load_misses_total",
        "edgeacc:host_cache_hit_rate",
        "edgeacc:num_loading_reqs",
    ):
        assert name in text
    llm.close()


def test_tier_without_ray_is_refused_before_the_model_loads():
    """The offline engine does not start a Ray cluster on its own (a fresh process: this one has Ray)."""
    code = (
        "from edgeacc_ray.llm import LLM\n"
        "from edgeacc_ray.engine.kv.tier import TierUnavailable\n"
        "try:\n    LLM('no-such-model', enable_hierarchical_cache=True)\n"
        "except TierUnavailable as e:\n    print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "refused: enable_hierarchical_cache needs a Ray cluster" in out.stdout, out.stderr[
        -2000:
    ]


def test_settings_env_and_enable_edge_acc():
    assert ServeConfig.from_sources({}, env={}).enable_hierarchical_cache is False
    cfg = ServeConfig.from_sources(
        {},
        env={
            "EDGEACC_ENABLE_HIERARCHICAL_CACHE": "true",
            "EDGEACC_KV_CACHE_OFFLOAD_MEMORY_GB": "2.5",
        },
    )
    engine = cfg.engine_config()
    assert engine.enable_hierarchical_cache is True and engine.kv_cache_offload_memory_gb == 2.5
    edge = ServeConfig.from_sources({}, env={"ENABLE_EDGE_ACC": "True"})
    assert edge.enable_hierarchical_cache is True
    assert (
        ServeConfig.model_validate(edge.model_dump()).enable_hierarchical_cache is True
    )  # reaches the replicas
    assert (
        ServeConfig.from_sources(
            {"enable_hierarchical_cache": False}, env={"ENABLE_EDGE_ACC": "1"}
        ).enable_hierarchical_cache
        is False
    )
    assert (
        ServeConfig.from_sources(
            {"enable_prefix_caching": False}, env={"ENABLE_EDGE_ACC": "1"}
        ).enable_hierarchical_cache
        is False
    )
    with pytest.raises(ConfigError, match="enable_hierarchical_cache needs enable_prefix_caching"):
        ServeConfig.from_sources(
            {"enable_hierarchical_cache": True, "enable_prefix_caching": False}, env={}
        )
