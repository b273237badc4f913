"""Prompt (input) logprobs equal HF transformers' fp32 log-softmax of the prompt (tiny model) within
1e-4: in the engine however the prompt is chunked, next to requests that do not ask, past a prefix-cache
hit (the cache serves only the positions before the first one scored), through preemption and across
Semi-PD's prefill handoff; and over HTTP as completions' echo with logprobs, vLLM's prompt_logprobs and
SGLang's logprob_start_len / top_logprobs_num."""

from __future__ import annotations

import json

import pytest
import torch
from serve_helpers import local_app
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgeacc_ray.config import SemiPDConfig, ServeConfig
from edgeacc_ray.engine.request import InvalidRequest, SamplingParams
from edgeacc_ray.llm import LLM
from tests.test_engine_correctness import OPTIMISTIC, TEXT, assert_pool_idle, random_ids

TOL = 1e-4


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def reference(tiny_model_path):
    """prompt ids -> HF's fp32 log-softmax at every position, [len, vocab] (memoised)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    cache: dict[tuple, torch.Tensor] = {}

    def run(ids: list[int]) -> torch.Tensor:
        if tuple(ids) not in cache:
            with torch.no_grad():
                cache[tuple(ids)] = torch.log_softmax(
                    model(torch.tensor([ids])).logits[0].float(), dim=-1
                )
        return cache[tuple(ids)]

    return run


def check(entries, ids: list[int], start: int, ref: torch.Tensor, top_n: int) -> None:
    """Entries for ids[start:], the first None, the rest the logprob of each token at the position
    before it, with the top_n alternatives, as HF computes them."""
    assert entries is not None and len(entries) == len(ids) - start and entries[0] is None
    for j in range(start + 1, len(ids)):
        e, row = entries[j - start], ref[j - 1]
        assert e.token_id == ids[j]
        assert abs(e.logprob - float(row[ids[j]])) < TOL, (j, e.logprob, float(row[ids[j]]))
        near = int((abs(row - row[ids[j]]) <= TOL).sum())  # tokens within TOL may rank either way
        assert abs(e.rank - (int((row > row[ids[j]]).sum()) + 1)) < near
        assert len(e.top) == top_n
        best = row.topk(top_n).values.tolist() if top_n else []
        assert all(
            abs(v - b) < TOL and abs(v - float(row[t])) < TOL for (t, v), b in zip(e.top, best)
        )


def prompts(tokenizer) -> list[list[int]]:
    ids = tokenizer.encode(TEXT)
    return [ids[:1], ids[:17], ids[:100], random_ids(7, 45), ids[60:90]]


@pytest.mark.parametrize("page_size,budget", [(16, 2048), (4, 7)])
def test_engine_prompt_logprobs_equal_hf(tokenizer, reference, page_size, budget):
    """In one batch: whole prompts and prompts from a start, top-k and none, beside a request that asks
    for none (its output is unchanged); with budget 7 every long prompt is split over many chunks."""
    batch = prompts(tokenizer)
    asks = [(0, 2), (0, 0), (0, 5), (20, 1), None]
    params = [
        SamplingParams(
            temperature=0.0,
            max_tokens=3,
            ignore_eos=True,
            **({} if a is None else dict(prompt_logprobs=a[1], prompt_logprobs_start=a[0])),
        )
        for a in asks
    ]
    llm = LLM(
        "tiny", dtype="float32", num_pages=512, page_size=page_size, max_num_batched_tokens=budget
    )
    outs = llm.generate(batch, params)
    plain = llm.generate(batch, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    for ids, ask, out, again in zip(batch, asks, outs, plain):
        assert out.token_ids == again.token_ids
        if ask is None:
            assert out.prompt_logprobs is None
        else:
            check(out.prompt_logprobs, ids, ask[0], reference(ids), ask[1])
    assert_pool_idle(llm)


def test_prefix_cache_serves_only_positions_before_the_scored_ones(tokenizer, reference):
    ids = tokenizer.encode(TEXT)[:70]
    llm = LLM("tiny", dtype="float32", num_pages=256, page_size=4, max_num_batched_tokens=16)
    greedy = dict(temperature=0.0, max_tokens=2, ignore_eos=True)
    [first] = llm.generate(ids, SamplingParams(**greedy))  # fills the cache
    [whole] = llm.generate(ids, SamplingParams(**greedy, prompt_logprobs=1))
    assert whole.num_cached_tokens == 0
    check(whole.prompt_logprobs, ids, 0, reference(ids), 1)
    [tail] = llm.generate(
        ids, SamplingParams(**greedy, prompt_logprobs=1, prompt_logprobs_start=30)
    )
    assert tail.num_cached_tokens == 28  # pages wholly before position 30
    check(tail.prompt_logprobs, ids, 30, reference(ids), 1)
    [last] = llm.generate(ids, SamplingParams(**greedy))
    assert (
        last.num_cached_tokens == 68
        and first.token_ids == whole.token_ids == tail.token_ids == last.token_ids
    )
    assert_pool_idle(llm)


def test_preemption_mid_prompt_keeps_every_entry_once(tokenizer, reference):
    """A pool of 24 pages of 4 tokens with optimistic reservations retracts sequences, some in the
    middle of their chunked prompt; their entries are neither lost nor repeated."""
    text_ids = tokenizer.encode(TEXT)
    batch = [text_ids[:37], random_ids(40, 45), text_ids[60:100]]
    llm = LLM(
        "tiny", dtype="float32", num_pages=24, page_size=4, max_num_batched_tokens=9, **OPTIMISTIC
    )
    outs = llm.generate(
        batch, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, prompt_logprobs=2)
    )
    assert llm.engine.scheduler.num_preemptions > 0
    for ids, out in zip(batch, outs):
        check(out.prompt_logprobs, ids, 0, reference(ids), 2)
    assert_pool_idle(llm)


def test_semi_pd_carries_prompt_logprobs_across_the_handoff(tokenizer, reference):
    ids = tokenizer.encode(TEXT)[:150]
    llm = LLM(
        "tiny",
        dtype="float32",
        max_num_batched_tokens=48,
        semi_pd=SemiPDConfig(prefill_batch_tokens=64),
    )
    try:
        greedy = dict(temperature=0.0, max_tokens=3, ignore_eos=True)
        outs = llm.generate(
            [ids, ids[:20]], [SamplingParams(**greedy, prompt_logprobs=3), SamplingParams(**greedy)]
        )
        check(outs[0].prompt_logprobs, ids, 0, reference(ids), 3)
        assert outs[1].prompt_logprobs is None
        [tail] = llm.generate(
            ids, SamplingParams(**greedy, prompt_logprobs=0, prompt_logprobs_start=100)
        )
        assert tail.num_cached_tokens == 96  # a prefix hit below the first scored position
        check(tail.prompt_logprobs, ids, 100, reference(ids), 0)
        assert tail.token_ids == outs[0].token_ids
    finally:
        llm.close()


@pytest.mark.parametrize(
    "params, field",
    [
        (dict(prompt_logprobs=21), "prompt_logprobs"),
        (dict(prompt_logprobs=-1), "prompt_logprobs"),
        (dict(prompt_logprobs=0, prompt_logprobs_start=5), "prompt_logprobs_start"),
        (dict(prompt_logprobs=0, prompt_logprobs_start=-1), "prompt_logprobs_start"),
    ],
)
def test_engine_refuses_bad_prompt_logprobs(params, field):
    llm = LLM("tiny", dtype="float32", num_pages=64)
    with pytest.raises(InvalidRequest) as info:
        llm.generate([1, 2, 3, 4, 5], SamplingParams(max_tokens=1, **params))
    assert info.value.field == field


# ---- over HTTP --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http():
    cfg = ServeConfig(
        model="tiny",
        served_model_name="tiny",
        kv_cache_memory_gb=0.05,
        max_model_len=512,
        dtype="float32",
        max_num_batched_tokens=16,
        stream_interval=2,
    )
    with local_app(cfg) as client:
        yield client


def test_completions_echo_with_logprobs(http, tokenizer, reference):
    """The prompt's tokens lead the choice's logprobs (the first null), twice: the second run's prompt
    is in the prefix cache but every position is still computed; the stream's first chunk agrees."""
    text = TEXT[:300]
    ids = tokenizer.encode(text)
    ref = reference(ids)
    body = {
        "model": "tiny",
        "prompt": text,
        "max_tokens": 3,
        "temperature": 0,
        "echo": True,
        "logprobs": 2,
    }
    for _ in range(2):
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        lp = choice["logprobs"]
        assert choice["text"].startswith(text) and len(lp["tokens"]) == len(ids) + 3
        assert lp["tokens"][: len(ids)] == [tokenizer.decode([t]) for t in ids]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for j in range(1, len(ids)):
            assert abs(lp["token_logprobs"][j] - float(ref[j - 1, ids[j]])) < TOL
            assert len(lp["top_logprobs"][j]) <= 2
        assert lp["text_offset"][0] == 0 and lp["text_offset"][len(ids)] == len(text)
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    streamed = [e["choices"][0]["logprobs"] for e in events]
    assert streamed[0]["tokens"][: len(ids)] == lp["tokens"][: len(ids)]
    assert sum((e["token_logprobs"] for e in streamed), []) == lp["token_logprobs"]


def test_vllm_prompt_logprobs(http, tokenizer, reference):
    text = "The quick brown fox jumps over the lazy dog"
    ids = tokenizer.encode(text)
    r = http.post(
        "/v1/completions",
        json={"model": "tiny", "prompt": text, "max_tokens": 2, "prompt_logprobs": 1},
    )
    assert r.status_code == 200, r.text
    entries = r.json()["choices"][0]["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    for j in range(1, len(ids)):
        mine = entries[j][str(ids[j])]
        assert abs(mine["logprob"] - float(reference(ids)[j - 1, ids[j]])) < TOL
        assert mine["decoded_token"] == tokenizer.decode([ids[j]]) and mine["rank"] >= 1
        assert 1 <= len(entries[j]) <= 2
    chat = http.post(
        "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
            "prompt_logprobs": 0,
        },
    )
    assert chat.status_code == 200, chat.text
    assert len(chat.json()["prompt_logprobs"]) == chat.json()["usage"]["prompt_tokens"]


def test_sglang_input_logprobs(http, tokenizer, reference):
    ids = tokenizer.encode(TEXT[:200])
    ref = reference(ids)
    body = {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": 2, "temperature": 0},
        "return_logprob": True,
        "logprob_start_len": 3,
        "top_logprobs_num": 2,
        "return_text_in_logprobs": True,
    }
    meta = http.post("/generate", json=body).json()["meta_info"]
    got, tops = meta["input_token_logprobs"], meta["input_top_logprobs"]
    assert len(got) == len(tops) == len(ids) - 3
    assert got[0] == [None, ids[3], tokenizer.decode([ids[3]])] and tops[0] is None
    for j in range(4, len(ids)):
        value, token, text = got[j - 3]
        assert (
            token == ids[j]
            and text == tokenizer.decode([token])
            and abs(value - float(ref[j - 1, token])) < TOL
        )
        assert all(
            abs(v - b) < TOL and text == tokenizer.decode([t])
            for (v, t, text), b in zip(tops[j - 3], ref[j - 1].topk(2).values.tolist())
        )
    assert len(meta["output_token_logprobs"]) == 2
    later = http.post("/generate", json={**body, "logprob_start_len": 40}).json()["meta_info"]
    assert later["cached_tokens"] == 32  # a prefix-cache hit on the pages before position 40
    assert later["input_token_logprobs"][0][0] is None
    assert all(
        abs(a[0] - b[0]) < TOL and a[1:] == b[1:]
        for a, b in zip(later["input_token_logprobs"][1:], got[38:])
    )
    default = http.post(
        "/generate", json={**body, "logprob_start_len": -1, "top_logprobs_num": 0}
    ).json()["meta_info"]
    assert default["input_token_logprobs"] == [[None, ids[-1], tokenizer.decode([ids[-1]])]]
    with http.stream("POST", "/generate", json={**body, "stream": True}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert all(e["meta_info"]["input_token_logprobs"] == got for e in events)


@pytest.mark.parametrize(
    "path, body, param",
    [
        (
            "/generate",
            {"input_ids": [1, 2, 3], "return_logprob": True, "logprob_start_len": 3},
            "logprob_start_len",
        ),
        (
            "/generate",
            {"input_ids": [1, 2, 3], "return_logprob": True, "logprob_start_len": -2},
            "logprob_start_len",
        ),
        (
            "/generate",
            {
                "input_ids": [1, 2, 3],
                "return_logprob": True,
                "logprob_start_len": 0,
                "top_logprobs_num": 21,
            },
            "top_logprobs_num",
        ),
        ("/v1/completions", {"prompt": "hi", "echo": True, "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs"),
        (
            "/v1/completions",
            {"prompt": "hi", "prompt_logprobs": 1, "stream": True},
            "prompt_logprobs",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "prompt_logprobs": 1, "stream": True},
            "prompt_logprobs",
        ),
    ],
)
def test_bad_prompt_logprobs_are_400_naming_the_field(http, path, body, param):
    r = http.post(path, json={"max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    ok = http.post(
        "/generate", json={"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}}
    )
    assert ok.status_code == 200
