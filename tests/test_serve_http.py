"""The Serve application over real HTTP on a real Ray cluster: OpenAI client, SGLang /generate, errors,
concurrency, client disconnects and parity with the offline engine."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

MODEL = "tiny"


@pytest.fixture(scope="module")
def url(serve_app_url) -> str:
    return serve_app_url


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def engine_state(url: str) -> dict:
    return httpx.get(url + "/get_server_info", timeout=10).json()["internal_states"][0]


def wait_idle(url: str, timeout: float = 15.0) -> dict:
    """Wait until no request runs or waits and no page is held by a live sequence."""
    deadline = time.monotonic() + timeout
    while True:
        s = engine_state(url)
        # every page is free or an evictable prefix-cache page (robust to whether "free" counts the latter)
        all_back = s["num_free_pages"] + s["num_cached_pages"] >= s["num_total_pages"]
        if s["num_running_reqs"] == 0 and s["num_queue_reqs"] == 0 and all_back:
            return s
        assert time.monotonic() < deadline, f"engine not idle: {s}"
        time.sleep(0.1)


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ---- OpenAI API ---------------------------------------------------------------------------------


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].max_model_len == 2048


def test_chat_non_streaming_with_usage(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=12,
        temperature=0,
    )
    assert r.object == "chat.completion" and r.model == MODEL
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_streaming_matches_non_streaming(client):
    question = "Count to five, then explain in a few words why counting is useful for programmers and for cooks."
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        max_completion_tokens=20,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    full = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    # the prompt was just computed by the non-streaming call: its full pages come from the prefix cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_chat_stream_ends_with_done(url):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "stream": True,
    }
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])


def test_completions_non_streaming_and_streaming(client):
    r = client.completions.create(
        model=MODEL,
        prompt="def fibonacci(n):",
        max_tokens=16,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 16
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="def fibonacci(n):",
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == 16


def test_completions_batch_n_and_echo(client):
    r = client.completions.create(
        model=MODEL,
        prompt=["import os", "class Foo:"],
        n=2,
        max_tokens=4,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert (
        r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text
    )  # greedy
    assert r.usage.completion_tokens == 16
    e = client.completions.create(
        model=MODEL, prompt="import os", max_tokens=3, temperature=0, echo=True
    )
    assert e.choices[0].text.startswith("import os")


def test_token_id_prompt_and_stop(client):
    base = client.completions.create(
        model=MODEL,
        prompt="for i in range(",
        max_tokens=24,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    text = base.choices[0].text
    stop = text[5:8] if len(text) >= 8 else None
    if not stop or not stop.strip():
        pytest.skip("greedy text too short to pick a stop string")
    r = client.completions.create(
        model=MODEL,
        prompt="for i in range(",
        max_tokens=24,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].text
    assert text.startswith(r.choices[0].text)


def test_sampling_seed_top_p_penalties(client):
    kw = dict(
        model=MODEL,
        prompt="The quick brown",
        max_tokens=16,
        temperature=1.0,
        top_p=0.9,
        seed=1234,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        extra_body={"ignore_eos": True},
    )
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text  # same seed, same text
    n2 = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        n=2,
        seed=7,
        max_tokens=8,
        temperature=1.0,
    )
    assert len(n2.choices) == 2 and n2.usage.completion_tokens <= 16


def test_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert (
            entry.token == entry.top_logprobs[0].token
        )  # greedy: the chosen token is the best one
    c = client.completions.create(
        model=MODEL,
        prompt="hello",
        max_tokens=5,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == c.choices[0].text


# ---- SGLang-native API ---------------------------------------------------------------------------

SEED_CURL_BODY = (
    '{"text": "Once upon a time,", "sampling_params": {"max_new_tokens": 16, "temperature": 0}}'
)


def test_generate_seed_curl_body(url):
    # curl -s http://localhost:8000/generate -H "Content-Type: application/json" -d '<SEED_CURL_BODY>'
    r = httpx.post(
        url + "/generate",
        content=SEED_CURL_BODY,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    out = r.json()
    meta = out["meta_info"]
    assert isinstance(out["text"], str)
    assert meta["prompt_tokens"] > 0 and 1 <= meta["completion_tokens"] <= 16
    assert meta["completion_tokens"] == len(out["output_ids"])
    assert meta["cached_tokens"] >= 0 and meta["e2e_latency"] > 0
    fr = meta["finish_reason"]
    assert fr["type"] in ("length", "stop")
    if fr["type"] == "length":
        assert fr["length"] == 16 and meta["completion_tokens"] == 16


def test_generate_streaming_is_cumulative(url):
    body = {
        "text": "Once upon a time,",
        "sampling_params": {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True},
        "stream": True,
    }
    with httpx.stream("POST", url + "/generate", json=body, timeout=30) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    texts = [e["text"] for e in events[:-1]]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    last = events[-2]
    assert last["meta_info"]["finish_reason"] == {"type": "length", "length": 16}
    assert last["meta_info"]["completion_tokens"] == 16
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-2])
    full = httpx.post(url + "/generate", json={**body, "stream": False}, timeout=30).json()
    assert full["text"] == last["text"] and full["output_ids"] == last["output_ids"]


def test_generate_input_ids_batch_logprobs_and_params(url):
    body = {
        "input_ids": [[10, 20, 30], [40, 50]],
        "sampling_params": {
            "max_new_tokens": 4,
            "temperature": 0.7,
            "top_k": 20,
            "min_p": 0.05,
            "top_p": 0.9,
            "ignore_eos": True,
            "stop_token_ids": [1],
            "repetition_penalty": 1.1,
            "frequency_penalty": 0.1,
            "presence_penalty": 0.1,
        },
        "return_logprob": True,
        "top_logprobs_num": 2,
        "return_text_in_logprobs": True,
    }
    r = httpx.post(url + "/generate", json=body, timeout=30)
    assert r.status_code == 200, r.text
    outs = r.json()
    assert isinstance(outs, list) and len(outs) == 2
    for out, plen in zip(outs, (3, 2)):
        meta = out["meta_info"]
        assert meta["prompt_tokens"] == plen
        assert (
            len(meta["output_token_logprobs"])
            == meta["completion_tokens"]
            == len(out["output_ids"])
        )
        lp, tid, text = meta["output_token_logprobs"][0]
        assert lp <= 0 and tid == out["output_ids"][0] and isinstance(text, str)
        assert all(len(top) == 2 for top in meta["output_top_logprobs"])


def test_generate_rejects_unknown_sampling_param(url):
    r = httpx.post(
        url + "/generate", json={"text": "x", "sampling_params": {"max_new_tokenz": 3}}, timeout=30
    )
    assert r.status_code == 400 and "max_new_tokenz" in r.json()["error"]["message"]


# ---- server endpoints ----------------------------------------------------------------------------


def test_health_info_flush_and_metrics(url):
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    assert httpx.get(url + "/health_generate", timeout=30).status_code == 200
    info = httpx.get(url + "/get_model_info", timeout=10).json()
    assert (
        info["is_generation"] is True and info["served_model_name"] == MODEL and info["model_path"]
    )
    server = httpx.get(url + "/get_server_info", timeout=10).json()
    assert server["served_model_name"] == MODEL and server["host"] == "127.0.0.1"
    assert server["internal_states"][0]["num_total_pages"] > 0
    assert (
        server["tpot_slo_ms"] is None and server["ttft_slo_ms"] is None
    )  # no SLO unless the user sets one
    assert server["internal_states"][0]["slo_targets"]["running_bound_tpot"] == {
        "name": "running_bound_tpot",
        "ms": None,
        "source": "none",
        "floor_ms": None,
    }
    r = httpx.post(url + "/flush_cache", timeout=10)
    assert r.status_code == 200 and "flushed" in r.text.lower()
    text = httpx.get(url + "/metrics", timeout=10).text
    for name in (
        "sglang:num_running_reqs",
        "sglang:num_queue_reqs",
        "sglang:token_usage",
        "sglang:cache_hit_rate",
        "sglang:prompt_tokens_total",
        "sglang:generation_tokens_total",
        "sglang:cached_tokens_total",
        "sglang:time_to_first_token_seconds_bucket",
        "sglang:inter_token_latency_seconds_bucket",
        "sglang:time_per_output_token_seconds_bucket",
        "sglang:e2e_request_latency_seconds_count",
    ):
        assert f"{name}{{" in text, name
    assert 'sglang:num_running_reqs{model_name="tiny"}' in text
    ttft_count = [
        ln for ln in text.splitlines() if ln.startswith("sglang:time_to_first_token_seconds_count")
    ]
    assert float(ttft_count[0].split()[-1]) > 0


# ---- errors ----------------------------------------------------------------------------------------


def _err(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


@pytest.mark.parametrize(
    "body, param",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 2}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"presence_penalty": 5}, "presence_penalty"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 100}, "top_logprobs"),
        ({"temperature": "hot"}, "temperature"),
        ({"messages": []}, "messages"),
    ],
)
def test_invalid_parameters_are_400(url, body, param):
    req = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body}
    err = _err(httpx.post(url + "/v1/chat/completions", json=req, timeout=30), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_unknown_model_is_404(client, url):
    err = _err(
        httpx.post(url + "/v1/completions", json={"model": "gpt-9", "prompt": "x"}, timeout=30), 404
    )
    assert "gpt-9" in err["message"] and err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])


def test_prompt_too_long_is_400_with_limits(url, client):
    long_prompt = list(range(100, 100 + 2100))
    err = _err(
        httpx.post(
            url + "/v1/completions", json={"model": MODEL, "prompt": long_prompt}, timeout=30
        ),
        400,
    )
    assert "2048" in err["message"] and "2100" in err["message"]
    err = _err(
        httpx.post(
            url + "/v1/completions",
            json={"model": MODEL, "prompt": long_prompt[:1000], "max_tokens": 1500},
            timeout=30,
        ),
        400,
    )
    assert "2048" in err["message"] and "2500" in err["message"] and err["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=long_prompt)
    g = _err(httpx.post(url + "/generate", json={"input_ids": long_prompt}, timeout=30), 400)
    assert "2048" in g["message"]


def test_malformed_json_is_400(url):
    r = httpx.post(
        url + "/v1/chat/completions",
        content=b'{"model": "tiny", "messages": [',
        timeout=30,
        headers={"Content-Type": "application/json"},
    )
    err = _err(r, 400)
    assert "JSON" in err["message"]
    _err(
        httpx.post(
            url + "/generate",
            content=b"not json",
            timeout=30,
            headers={"Content-Type": "application/json"},
        ),
        400,
    )


def test_unknown_route_is_404_json(url):
    _err(httpx.get(url + "/v1/nothing", timeout=10), 404)


# ---- load, disconnects, parity -----------------------------------------------------------------------


def test_32_concurrent_streams_complete_with_exact_token_counts(url):
    async def one(aclient: openai.AsyncOpenAI, i: int):
        stream = await aclient.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Request number {i}: tell a story."}],
            max_tokens=48,
            temperature=0.8,
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
            logprobs=True,
            extra_body={"ignore_eos": True},
        )
        tokens, finish, usage, text, sizes = 0, None, None, "", []
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                k = len(c.logprobs.content) if c.logprobs and c.logprobs.content else 0
                tokens += k
                sizes += [k] if k else []
                text += c.delta.content or ""
                finish = c.finish_reason or finish
        return tokens, finish, usage, text, sizes

    async def main():
        async with openai.AsyncOpenAI(
            base_url=url + "/v1", api_key="x", max_retries=0, timeout=120
        ) as aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(32)))

    results = asyncio.run(main())
    assert len(results) == 32
    interval = 4  # SERVE_TEST_ARGS["stream_interval"]
    for tokens, finish, usage, _text, sizes in results:
        assert tokens == 48 and finish == "length" and usage.completion_tokens == 48
        # the first token leaves at once; then chunks of at least `stream_interval` tokens (the last may be short)
        assert sizes[0] < interval and all(k >= interval for k in sizes[1:-1]), sizes
    wait_idle(url)


def test_disconnect_mid_stream_aborts_and_frees_pages(url):
    before = engine_state(url)
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 1900,
        "stream": True,
        "ignore_eos": True,
    }
    during = None
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    during = engine_state(url)
                    break
            lines.close()  # stop reading: the client goes away mid-stream
    assert during is not None and during["num_running_reqs"] == 1
    # the response was closed unread: the connection is gone
    after = wait_idle(url, timeout=15)
    assert after["requests_aborted_total"] == before["requests_aborted_total"] + 1
    assert after["num_free_pages"] + after["num_cached_pages"] >= after["num_total_pages"]


def test_greedy_http_output_equals_offline_engine(url):
    from edgeacc_ray.engine.request import SamplingParams
    from edgeacc_ray.llm import LLM

    prompts = [
        "Once upon a time,",
        "import numpy as np\n",
        "The capital of France is",
        "def main():",
    ]
    http = [
        httpx.post(
            url + "/generate",
            json={"text": p, "sampling_params": {"max_new_tokens": 24, "temperature": 0}},
            timeout=60,
        ).json()
        for p in prompts
    ]
    llm = LLM("tiny", kv_cache_memory_gb=0.05)
    offline = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0))
    for h, o in zip(http, offline):
        assert h["output_ids"] == o.token_ids
        assert h["text"] == o.text


def test_streaming_fan_out_n_and_batches(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "go"}],
            n=3,
            max_tokens=10,
            temperature=0.9,
            seed=3,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    finished = sorted(
        c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason
    )
    assert finished == [0, 1, 2]
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=["a", "b"],
            n=2,
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    finished = sorted(
        c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason
    )
    assert finished == [0, 1, 2, 3] and chunks[-1].usage.completion_tokens == 20


@pytest.mark.parametrize("mode", ["per_request", "multiplexed"])
def test_engine_client_modes_agree_and_abort(url, mode):
    """The Ingress's client of the engine side, used directly through a DeploymentHandle."""
    from ray import serve

    from deployments.engine_client import InvalidRequest, ServeEngineClient
    from edgeacc_ray.engine.request import SamplingParams

    handle = serve.get_deployment_handle("EngineServer", app_name="edgeacc")
    ids = [101, 202, 303, 404, 505]

    async def main():
        client = ServeEngineClient(handle, mode)
        tokens = []
        async for chunk in client.generate(
            f"direct-{mode}", ids, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        ):
            tokens += chunk.token_ids
        with pytest.raises(InvalidRequest, match="top_p"):
            async for _ in client.generate(f"bad-{mode}", ids, SamplingParams(top_p=7.0)):
                pass
        stream = client.generate(
            f"abort-{mode}", ids, SamplingParams(max_tokens=1500, ignore_eos=True)
        )
        await stream.__anext__()
        await stream.aclose()  # leave early: the engine aborts the request
        return tokens

    before = engine_state(url)["requests_aborted_total"]
    tokens = asyncio.run(main())
    offline = httpx.post(
        url + "/generate",
        json={
            "input_ids": ids,
            "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True},
        },
        timeout=30,
    ).json()["output_ids"]
    assert tokens == offline
    after = wait_idle(url)
    assert after["requests_aborted_total"] == before + 1
