"""The native engine's greedy output equals HF transformers token for token (fp32, tiny model),
however the prompt is split (chunked prefill), wherever its pages come from (prefix cache, shared
prefixes), with small pages and with a KV pool so small that sequences are preempted; bf16 agrees
with fp32 on the first token of most prompts."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from edgeacc_ray.config import EngineConfig
from edgeacc_ray.engine.request import SamplingParams
from edgeacc_ray.llm import LLM

VOCAB = 8000
NEW_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
# Reservations of a tenth of the output: a small pool runs short and running sequences are retracted.
OPTIMISTIC = dict(new_token_ratio_init=0.1, new_token_ratio_min=0.1)

TEXT = (
    "Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex. "
    "Complex is better than complicated. Flat is better than nested. Sparse is better than dense. "
    "Readability counts. Special cases aren't special enough to break the rules. Although practicality "
    "beats purity. Errors should never pass silently. Unless explicitly silenced. In the face of "
    "ambiguity, refuse the temptation to guess. There should be one-- and preferably only one --obvious "
    "way to do it. Although that way may not be obvious at first unless you're Dutch. Now is better than "
    "never. Although never is often better than *right* now. If the implementation is hard to explain, "
    "it's a bad idea. If the implementation is easy to explain, it may be a good idea. Namespaces are one "
    "honking great idea -- let's do more of those!\n\ndef fibonacci(n):\n    a, b = 0, 1\n    for _ in "
    "range(n):\n        a, b = b, a + b\n    return a\n\nclass Stack:\n    def __init__(self):\n        "
    "self.items = []\n    def push(self, item):\n        self.items.append(item)\n"
)


def assert_pool_idle(llm: LLM) -> None:
    """Every page is back (free or cached-but-unreferenced), each exactly once, and nothing runs."""
    engine = llm.engine
    bm = engine.block_manager
    assert not engine.sequences and not engine.has_unfinished()
    assert bm.num_free_pages == bm.num_pages
    assert sum(bm.ref_count) == 0
    assert sorted(list(bm.free_pages) + list(bm.evictable)) == list(range(bm.num_pages))


@pytest.fixture(scope="module")
def hf_model(tiny_model_path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def hf_greedy(hf_model):
    """prompt ids, n -> HF `generate` greedy continuation of exactly n tokens (eos disabled); memoised."""
    cache: dict[tuple, list[int]] = {}
    config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0, bos_token_id=None)

    def run(prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
        key = (tuple(prompt), n)
        if key not in cache:
            ids = torch.tensor([prompt])
            config.max_new_tokens = config.min_new_tokens = n
            with torch.no_grad():
                out = hf_model.generate(
                    ids, attention_mask=torch.ones_like(ids), generation_config=config
                )
            cache[key] = out[0, len(prompt) :].tolist()
            assert len(cache[key]) == n
        return cache[key]

    return run


def random_ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [
        rng.randrange(0, VOCAB - 16) for _ in range(n)
    ]  # clear of the special tokens at the top


@pytest.fixture(scope="module")
def mixed_prompts(tokenizer) -> list[list[int]]:
    """Prompts from 1 to ~300 tokens, text and random ids, around page boundaries (16) too."""
    text_ids = tokenizer.encode(TEXT)
    assert len(text_ids) >= 250
    prompts = [
        text_ids[:1],
        text_ids[:2],
        text_ids[:15],
        text_ids[:16],
        text_ids[:17],
        text_ids[:33],
        text_ids[40:140],
        text_ids[:250],
    ]
    prompts += [
        random_ids(1, 1),
        random_ids(2, 7),
        random_ids(3, 64),
        random_ids(4, 129),
        random_ids(5, 300),
    ]
    return prompts


def assert_equal_to_hf(outputs, prompts, hf_greedy) -> None:
    mismatches = []
    for prompt, out in zip(prompts, outputs):
        assert out.finish_reason == "length"
        expected = hf_greedy(prompt)
        if out.token_ids != expected:
            mismatches.append((len(prompt), out.token_ids, expected))
    assert not mismatches, f"(prompt length, engine, HF) differ: {mismatches}"


# ---- fp32 equality with HF ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm32() -> LLM:
    return LLM("tiny", dtype="float32", num_pages=1024)


def test_mixed_batch_equals_hf(llm32, mixed_prompts, hf_greedy):
    outputs = llm32.generate(mixed_prompts, GREEDY)
    assert [o.prompt_token_ids for o in outputs] == mixed_prompts
    assert_equal_to_hf(outputs, mixed_prompts, hf_greedy)
    assert_pool_idle(llm32)


def test_one_at_a_time_equals_batched(llm32, mixed_prompts, hf_greedy):
    llm32.engine.flush_cache()
    for prompt in mixed_prompts[::3]:
        [out] = llm32.generate(prompt, GREEDY)
        assert out.token_ids == hf_greedy(prompt)
    assert_pool_idle(llm32)


@pytest.mark.parametrize("budget", [7, 64])
def test_chunked_prefill_equals_hf(mixed_prompts, hf_greedy, budget):
    llm = LLM("tiny", dtype="float32", num_pages=1024, max_num_batched_tokens=budget)
    outputs = llm.generate(mixed_prompts, GREEDY)
    assert_equal_to_hf(outputs, mixed_prompts, hf_greedy)
    assert_pool_idle(llm)


def test_token_budget_smaller_than_running_batch(mixed_prompts, hf_greedy):
    """A per-step budget of 3 tokens cannot even cover one decode token per running sequence."""
    prompts = [p for p in mixed_prompts if len(p) <= 20]
    llm = LLM("tiny", dtype="float32", num_pages=256, page_size=4, max_num_batched_tokens=3)
    outputs = llm.generate(prompts, GREEDY)
    assert_equal_to_hf(outputs, prompts, hf_greedy)
    assert_pool_idle(llm)


@pytest.mark.skipif(
    "decode_workspace_memory_gb" not in EngineConfig.model_fields,
    reason="no decode workspace in this engine",
)
@pytest.mark.parametrize("workspace_gb", [0.0, 0.0021])
def test_decode_workspace_off_or_too_small_equals_hf(mixed_prompts, hf_greedy, workspace_gb):
    """Without a decode workspace, and with one that holds only a few rows (so some steps fall back
    to attending from the pages and rows are reused), the output is the same."""
    llm = LLM("tiny", dtype="float32", num_pages=1024, decode_workspace_memory_gb=workspace_gb)
    outputs = llm.generate(mixed_prompts, GREEDY)
    assert_equal_to_hf(outputs, mixed_prompts, hf_greedy)
    outputs = llm.generate(mixed_prompts[:4], GREEDY)  # few enough to fit in the workspace again
    assert_equal_to_hf(outputs, mixed_prompts[:4], hf_greedy)
    assert_pool_idle(llm)


def test_prefix_cache_hit_equals_hf(mixed_prompts, hf_greedy):
    llm = LLM("tiny", dtype="float32", num_pages=1024)
    long_prompts = [p for p in mixed_prompts if len(p) > 16]
    first = llm.generate(long_prompts, GREEDY)
    second = llm.generate(long_prompts, GREEDY)
    for prompt, a, b in zip(long_prompts, first, second):
        assert a.num_cached_tokens == 0
        assert b.num_cached_tokens == (len(prompt) - 1) // 16 * 16 > 0
        assert a.token_ids == b.token_ids == hf_greedy(prompt)
    assert_pool_idle(llm)


def test_prefix_cache_hit_with_chunked_prefill(mixed_prompts, hf_greedy):
    llm = LLM("tiny", dtype="float32", num_pages=1024, page_size=4, max_num_batched_tokens=7)
    prompt = mixed_prompts[-1]
    [a] = llm.generate(prompt, GREEDY)
    [b] = llm.generate(prompt, GREEDY)
    assert b.num_cached_tokens == (len(prompt) - 1) // 4 * 4
    assert a.token_ids == b.token_ids == hf_greedy(prompt)


@pytest.mark.parametrize("page_size,budget", [(16, 2048), (4, 2048), (16, 24)])
def test_shared_prefix_pages(tokenizer, hf_greedy, page_size, budget):
    """Prompts with a long common prefix, in one batch and in consecutive batches."""
    prefix = tokenizer.encode(TEXT)[:90]
    suffixes = [random_ids(10 + i, n) for i, n in enumerate([1, 5, 16, 23])]
    batch1 = [prefix + s for s in suffixes]
    batch2 = [prefix + random_ids(20 + i, n) for i, n in enumerate([2, 9, 30])]
    llm = LLM(
        "tiny", dtype="float32", num_pages=512, page_size=page_size, max_num_batched_tokens=budget
    )
    out1 = llm.generate(batch1, GREEDY)
    assert_equal_to_hf(out1, batch1, hf_greedy)
    out2 = llm.generate(batch2, GREEDY)
    assert_equal_to_hf(out2, batch2, hf_greedy)
    shared = len(prefix) // page_size * page_size
    assert all(o.num_cached_tokens == shared for o in out2), [o.num_cached_tokens for o in out2]
    assert_pool_idle(llm)


def test_small_pages_equal_hf(mixed_prompts, hf_greedy):
    llm = LLM("tiny", dtype="float32", num_pages=1024, page_size=4)
    outputs = llm.generate(mixed_prompts, GREEDY)
    assert_equal_to_hf(outputs, mixed_prompts, hf_greedy)
    assert_pool_idle(llm)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_in_tiny_pool_equals_hf(tokenizer, hf_greedy, prefix_caching):
    """A pool of 24 pages of 4 tokens holds about two of these sequences; admitted on optimistic
    reservations, some are preempted and recomputed, and every output still equals HF."""
    text_ids = tokenizer.encode(TEXT)
    prompts = [
        text_ids[:10],
        random_ids(30, 20),
        text_ids[50:80],
        random_ids(31, 12),
        text_ids[:25],
    ]
    n = 40
    llm = LLM(
        "tiny",
        dtype="float32",
        num_pages=24,
        page_size=4,
        enable_prefix_caching=prefix_caching,
        **OPTIMISTIC,
    )
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outputs):
        assert out.finish_reason == "length"
        assert out.token_ids == hf_greedy(prompt, n), len(prompt)
    assert_pool_idle(llm)


def test_preemption_with_chunked_prefill_equals_hf(tokenizer, hf_greedy):
    text_ids = tokenizer.encode(TEXT)
    prompts = [text_ids[:37], random_ids(40, 45), text_ids[60:100]]
    n = 20
    llm = LLM(
        "tiny", dtype="float32", num_pages=24, page_size=4, max_num_batched_tokens=9, **OPTIMISTIC
    )
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == hf_greedy(prompt, n), len(prompt)
    assert_pool_idle(llm)


def test_cached_tokens_never_exceed_prompt_after_preemption(tokenizer):
    """num_cached_tokens counts prompt tokens served from the prefix cache. A preempted sequence is
    recomputed from prompt + output; the pages it gets back on re-admission must not be reported as
    cached prompt tokens (it would claim more cached tokens than the prompt has)."""
    text_ids = tokenizer.encode(TEXT)
    prompts = [text_ids[:10], random_ids(30, 20), text_ids[50:80], random_ids(31, 12)]
    llm = LLM("tiny", dtype="float32", num_pages=24, page_size=4, **OPTIMISTIC)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outputs):
        assert out.num_cached_tokens <= len(prompt) - 1, (len(prompt), out.num_cached_tokens)
    assert (
        sum(o.num_cached_tokens for o in outputs) == llm.engine.stats().cached_prompt_tokens_total
    )


# ---- bf16 -----------------------------------------------------------------------------------------


def test_bf16_first_token_agrees_with_fp32(tokenizer, llm32):
    text_ids = tokenizer.encode(TEXT)
    prompts = [text_ids[i * 7 : i * 7 + 5 + i * 3] for i in range(16)] + [
        random_ids(100 + i, 3 + 9 * i) for i in range(16)
    ]
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    llm16 = LLM("tiny", dtype="bfloat16", num_pages=1024)
    assert llm16.engine.model_info["dtype"] == "bfloat16"
    fp32 = [o.token_ids[0] for o in llm32.generate(prompts, params)]
    bf16 = [o.token_ids[0] for o in llm16.generate(prompts, params)]
    agreement = sum(a == b for a, b in zip(fp32, bf16)) / len(prompts)
    print(f"\nbf16/fp32 first-token agreement: {agreement:.1%} over {len(prompts)} prompts")
    assert agreement >= 0.8
    assert_pool_idle(llm16)
