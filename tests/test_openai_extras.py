"""The rest of the sampling API (issue 11): vLLM's stream_options.continuous_usage_stats (every chunk
carries its choice's usage so far), parallel_tool_calls=false with tool_choice "auto" (generation ends
with the first call), and the OpenAI / vLLM / SGLang parameters this server does not implement: each is
refused with a 400 naming it, never silently ignored, and the server keeps serving."""

from __future__ import annotations

import asyncio
import json

import pytest
from serve_helpers import local_app

from edgeacc_ray.config import ServeConfig
from edgeacc_ray.engine.request import SamplingParams, StructuredOutput
from edgeacc_ray.http.preprocess import (
    UNSUPPORTED,
    UNSUPPORTED_CHAT,
    UNSUPPORTED_GENERATE,
    Preprocessor,
)
from edgeacc_ray.http.protocol.openai import ChatCompletionRequest, Tool
from edgeacc_ray.http.tool_calls import CLOSE, HermesTools, ToolCallStream
from edgeacc_ray.llm import LLM

CFG = dict(
    model="tiny",
    served_model_name="tiny",
    kv_cache_memory_gb=0.05,
    max_model_len=256,
    stream_interval=1,
)
CHAT = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 5,
    "temperature": 0,
    "ignore_eos": True,
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome"]}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]


@pytest.fixture(scope="module")
def http():
    with local_app(ServeConfig(**CFG)) as client:
        yield client


def events(http, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", CHAT),
        ("/v1/completions", {**CHAT, "prompt": "hi", "messages": None}),
    ],
)
@pytest.mark.parametrize("include_usage", [False, True])
def test_continuous_usage_stats(http, path, body, include_usage):
    """Every chunk's usage counts the tokens its choice has so far; with include_usage the last chunk
    still carries the totals."""
    body = {k: v for k, v in body.items() if v is not None}
    got = events(
        http,
        path,
        {
            **body,
            "n": 2,
            "stream": True,
            "stream_options": {"include_usage": include_usage, "continuous_usage_stats": True},
        },
    )
    choices = [e for e in got if e["choices"]]
    assert choices and all(e["usage"] is not None for e in choices)
    prompt = choices[0]["usage"]["prompt_tokens"]
    for index in (0, 1):
        counts = [
            e["usage"]["completion_tokens"] for e in choices if e["choices"][0]["index"] == index
        ]
        assert counts == sorted(counts) and counts[-1] == 5
        assert all(
            e["usage"]["total_tokens"] == prompt + e["usage"]["completion_tokens"] for e in choices
        )
    final = [e for e in got if not e["choices"]]
    assert len(final) == int(include_usage)
    if include_usage:
        assert final[0]["usage"]["completion_tokens"] == 10
    plain = events(http, path, {**body, "stream": True})
    assert all("usage" not in e for e in plain)


def test_stream_options_need_stream(http):
    r = http.post("/v1/chat/completions", json={**CHAT, "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"


def test_parallel_tool_calls_false_stops_after_the_first_call(tiny_model_path):
    """With tool_choice "auto" the request stops at the first `</tool_call>`; the stop is put back for
    parsing, so exactly one call comes out, whole and streamed alike. (A model that would go on to a
    second call is stood in for by a grammar that writes two.)"""
    pre = Preprocessor(ServeConfig(**CFG), tiny_model_path)

    def stops(parallel: bool, choice: str) -> list[str]:
        req = ChatCompletionRequest(
            **{**CHAT, "tools": TOOLS, "tool_choice": choice, "parallel_tool_calls": parallel}
        )
        return asyncio.run(pre.chat(req, 256)).prompts[0].params.stop

    assert stops(False, "auto") == [CLOSE]
    assert stops(True, "auto") == [] and stops(False, "required") == []
    tools = HermesTools([Tool(**t) for t in TOOLS], "auto", parallel=False)
    call = '"<tool_call>\\n{\\"name\\": \\"get_weather\\", \\"arguments\\": {\\"city\\": \\"Paris\\"}}\\n</tool_call>"'
    two_calls = StructuredOutput("lark", f'start: "Sure. " call "\\n" call\ncall: {call}')
    llm = LLM("tiny", dtype="float32", num_pages=64)
    params = SamplingParams(
        temperature=0.0, max_tokens=120, structured=two_calls, stop=tools.stop_strings()
    )
    [out] = llm.generate([5, 6, 7], params)
    assert out.stop_reason == CLOSE and out.text.count("<tool_call>") == 1 and CLOSE not in out.text
    content, calls = tools.parse(tools.untrim(out.text, out.stop_reason))
    assert content == "Sure."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    stream = ToolCallStream(tools)
    sent = "".join(stream.feed(out.text[i : i + 3]) for i in range(0, len(out.text), 3))
    rest, streamed = stream.finish(out.stop_reason)
    assert (sent + rest).strip() == "Sure." and [c.arguments for c in streamed] == [
        c.arguments for c in calls
    ]
    [free] = llm.generate(
        [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=120, structured=two_calls)
    )
    assert free.text.count(CLOSE) == 2  # without the stop, both calls are written


def _value(name: str, noop):
    """A value other than the parameter's no-op one."""
    if isinstance(noop, bool):
        return not noop
    if isinstance(noop, float):
        return noop + 1.0
    return {
        "truncate_prompt_tokens": 4,
        "allowed_token_ids": [1, 2],
        "bad_words": ["x"],
        "guided_json": {},
        "guided_regex": "a+",
        "guided_choice": ["a"],
        "guided_grammar": 'root ::= "a"',
        "structured_outputs": {"regex": "a"},
        "logits_processors": ["x"],
        "functions": [{"name": "f"}],
        "function_call": "auto",
        "input_embeds": [[0.0]],
        "image_data": "x.png",
        "audio_data": "x.wav",
        "video_data": "x.mp4",
        "lora_path": "x",
        "custom_logit_processor": "x",
        "token_ids_logprob": [1],
        "session_params": {"id": "x"},
    }[name]


UNSUPPORTED_CASES = (
    [
        ("/v1/completions", {"prompt": "hi"}, name, _value(name, noop))
        for name, (noop, _) in UNSUPPORTED.items()
    ]
    + [
        ("/v1/chat/completions", {"messages": CHAT["messages"]}, name, _value(name, noop))
        for name, (noop, _) in UNSUPPORTED_CHAT.items()
    ]
    + [
        ("/generate", {"text": "hi"}, name, _value(name, noop))
        for name, noop in UNSUPPORTED_GENERATE.items()
    ]
    + [
        (
            "/generate",
            {"text": "hi", "sampling_params": {"spaces_between_special_tokens": False}},
            "sampling_params.spaces_between_special_tokens",
            None,
        ),
        (
            "/generate",
            {"text": "hi", "sampling_params": {"no_stop_trim": True}},
            "sampling_params.no_stop_trim",
            None,
        ),
        (
            "/v1/chat/completions",
            {"messages": CHAT["messages"], "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
            None,
        ),
        (
            "/v1/chat/completions",
            {"messages": CHAT["messages"], "top_logprobs": 2},
            "top_logprobs",
            None,
        ),
        ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs", None),
        ("/v1/completions", {"prompt": "hi", "logprobs": -1}, "logprobs", None),
        (
            "/generate",
            {"text": "hi", "return_logprob": True, "top_logprobs_num": 21},
            "top_logprobs_num",
            None,
        ),
    ]
)


@pytest.mark.parametrize(
    "path, body, param, value", UNSUPPORTED_CASES, ids=[f"{c[0]}:{c[2]}" for c in UNSUPPORTED_CASES]
)
def test_unsupported_and_out_of_range_parameters_are_400_naming_them(
    http, path, body, param, value
):
    extra = {} if value is None else {param: value}
    r = http.post(path, json={"model": "tiny", "max_tokens": 2, **body, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert (
        http.post(
            "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 1}
        ).status_code
        == 200
    )
