"""The HTTP API on its ASGI app over an engine in this process (no Ray): validation and limits,
errors in OpenAI's shape, SSE framing, chat templating, /metrics, /openapi.json. The Ray-backed
behaviour (real HTTP, disconnects, replica deaths) is in test_serve_*.py."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from serve_helpers import local_app

from edgeacc_ray.config import ServeConfig
from edgeacc_ray.http.app import build_api
from edgeacc_ray.http.local_engine_client import LocalEngineClient

MODEL = "tiny"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def cfg() -> ServeConfig:
    return ServeConfig(
        model=MODEL,
        served_model_name=MODEL,
        kv_cache_memory_gb=0.05,
        max_model_len=256,
        stream_interval=2,
    )


@pytest.fixture(scope="module")
def http(cfg) -> TestClient:
    with local_app(cfg) as c:
        yield c


def error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def post_raw(http: TestClient, path: str, body: str):
    return http.post(path, content=body.encode(), headers={"content-type": "application/json"})


def sse_events(text: str) -> list:
    events = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ---- issue 13, item 1: valid JSON that is not valid text ----------------------------------------


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", '{"model": "tiny", "prompt": "\\ud800x", "max_tokens": 4}'),
        (
            "/v1/chat/completions",
            '{"model": "tiny", "messages": [{"role": "user", "content": "a\\udfffb"}]}',
        ),
        ("/generate", '{"text": "\\ud800", "sampling_params": {"max_new_tokens": 2}}'),
        ("/v1/completions", '{"model": "\\ud800", "prompt": "x"}'),
        ("/v1/completions", '{"model": "tiny", "prompt": "x", "stop": ["\\udc00"]}'),
    ],
)
def test_lone_surrogates_are_400(http, path, body):
    err = error(post_raw(http, path, body), 400)
    assert "surrogate" in err["message"]


def test_control_characters_and_long_tokens_are_served(http):
    r = http.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": "\x00\x01\x1b[31m\u2028" + "z" * 3000, "max_tokens": 2},
    )
    assert r.status_code in (200, 400), (
        r.text
    )  # 400 only when the prompt is longer than the context
    if r.status_code == 400:
        assert error(r, 400)["code"] == "context_length_exceeded"


# ---- issue 13, item 2: one request cannot take more than its share -------------------------------


def test_prompts_times_n_is_bounded(http, cfg):
    limit = cfg.request_choices_limit
    err = error(
        http.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": ["a"] * 1000, "n": 16, "max_tokens": 1},
        ),
        400,
    )
    assert (
        err["code"] == "too_many_choices" and str(limit) in err["message"] and err["param"] == "n"
    )
    error(
        http.post(
            "/generate",
            json={"text": ["a"] * (limit + 1), "sampling_params": {"max_new_tokens": 1}},
        ),
        400,
    )
    err = error(
        http.post(
            "/generate", json={"text": "a", "sampling_params": {"max_new_tokens": 1, "n": 17}}
        ),
        400,
    )
    assert err["param"] == "sampling_params.n"
    ok = http.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": ["a"] * (limit // 2), "n": 2, "max_tokens": 1},
    )
    assert ok.status_code == 200 and len(ok.json()["choices"]) == limit


@pytest.mark.parametrize(
    "body, param",
    [
        ({"stop": [f"s{i}" for i in range(17)]}, "stop"),
        ({"stop": ["x" * 257]}, "stop"),
        ({"n": 17}, "n"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"seed": 2**70}, "seed"),  # issue 13 item 7: was reported as a bad prompt
        ({"temperature": -1}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 100_000}, "max_completion_tokens"),
        ({"messages": [{"role": "bogus", "content": "x"}]}, "messages.0.role"),  # issue 13 item 7
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
        ({"logit_bias": {"99999": 1.0}}, "logit_bias"),
        ({"logit_bias": {"abc": 1.0}}, "logit_bias"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "objectx"}},
                }
            },
            "response_format",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
    ],
)
def test_invalid_chat_parameters_name_the_parameter(http, body, param):
    err = error(http.post("/v1/chat/completions", json={**CHAT, **body}), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_generate_engine_errors_use_sglang_names(http):
    err = error(
        http.post("/generate", json={"input_ids": [1, 2], "sampling_params": {"top_p": 7}}), 400
    )
    assert err["param"] == "sampling_params.top_p"
    err = error(http.post("/generate", json={"input_ids": [10**9]}), 400)
    assert err["param"] == "input_ids" and "vocabulary" in err["message"]
    err = error(http.post("/generate", json={"input_ids": list(range(5, 300))}), 400)
    assert err["code"] == "context_length_exceeded" and "256" in err["message"]


# ---- issue 13, item 7: HTTP details ------------------------------------------------------------------


def test_405_has_allow_header(http):
    r = http.get("/v1/chat/completions")
    assert error(r, 405)["code"] == "method_not_allowed"
    assert r.headers["allow"] == "POST"


def test_openapi_schema_and_docs_are_served(http):
    schema = http.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/generate", "/health", "/metrics"} <= set(
        schema["paths"]
    )
    assert "ChatCompletionRequest" in schema["components"]["schemas"]
    assert http.get("/docs").status_code == 200


# ---- behaviour through the ASGI app --------------------------------------------------------------------


def test_chat_template_and_usage(http):
    r = http.post("/v1/chat/completions", json={**CHAT, "temperature": 0, "ignore_eos": True})
    body = r.json()
    assert r.status_code == 200 and body["usage"]["completion_tokens"] == 4
    tokenizer = http.app.state.ctx.pre.tokenizer
    text = tokenizer.apply_chat_template(
        CHAT["messages"], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<|im_start|>user\nhi<|im_end|>") and text.endswith(
        "<|im_start|>assistant\n"
    )
    assert body["usage"]["prompt_tokens"] == len(tokenizer.encode(text, add_special_tokens=False))


def test_sse_framing_for_every_endpoint(http):
    bodies = {
        "/v1/chat/completions": {**CHAT, "stream": True, "stream_options": {"include_usage": True}},
        "/v1/completions": {"model": MODEL, "prompt": "x", "max_tokens": 4, "stream": True},
        "/generate": {"text": "x", "stream": True, "sampling_params": {"max_new_tokens": 4}},
    }
    for path, body in bodies.items():
        r = http.post(path, json={**body, "ignore_eos": True} if path != "/generate" else body)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.text.endswith("data: [DONE]\n\n")
        events = sse_events(r.text)
        assert events[-1] == "[DONE]" and all(isinstance(e, dict) for e in events[:-1])
    chat = sse_events(http.post("/v1/chat/completions", json=bodies["/v1/chat/completions"]).text)
    assert chat[-2]["usage"]["completion_tokens"] >= 1 and chat[-2]["choices"] == []


def test_metrics_are_prometheus_text_from_the_engine(http):
    from prometheus_client.parser import text_string_to_metric_families

    http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3})
    families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    assert families["sglang:num_requests"].type == "counter"
    assert families["sglang:num_requests"].samples[0].value >= 1
    ttft = families["sglang:time_to_first_token_seconds"]
    count = [s for s in ttft.samples if s.name.endswith("_count")][0]
    assert ttft.type == "histogram" and count.value >= 1 and count.labels == {"model_name": MODEL}


def test_not_ready_and_unknown_model(http):
    err = error(http.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404)
    assert err["code"] == "model_not_found"
    error(http.get("/nothing/here"), 404)


# ---- issue 9: overload answers ---------------------------------------------------------------------


def test_full_queue_is_429_with_retry_after():
    import asyncio

    import httpx

    cfg = ServeConfig(
        model=MODEL,
        served_model_name=MODEL,
        kv_cache_memory_gb=0.05,
        max_num_seqs=1,
        max_queued_requests=1,
        tpot_slo_ms=None,
    )
    client = LocalEngineClient(cfg.engine_config())
    app = build_api(cfg, client, client.model_path)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 200, "ignore_eos": True}

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://test", timeout=60
            ) as http:
                while (await http.get("/health")).status_code != 200:
                    await asyncio.sleep(0.05)
                first = asyncio.ensure_future(http.post("/v1/completions", json=body))
                while (await http.get("/get_server_info")).json()["internal_states"][0][
                    "num_running_reqs"
                ] < 1:
                    await asyncio.sleep(
                        0.01
                    )  # the first runs: the next one waits, the one after is refused
                later = await asyncio.gather(
                    *(http.post("/v1/completions", json=body) for _ in range(2))
                )
                return [await first, *later]

    try:
        answers = asyncio.run(main())
    finally:
        client.shutdown()
    refused = [r for r in answers if r.status_code != 200]
    assert [r.status_code for r in refused] == [429], [r.text for r in answers]
    assert int(refused[0].headers["retry-after"]) >= 1
    assert refused[0].json()["error"]["code"] == "queue_full"
