"""Tool calling in /v1/chat/completions (Hermes / Qwen format) with the official openai client on the
ASGI app: enforced calls always parse against the function's schema, a full round trip (call -> tool
answer -> reply), streamed tool-call deltas equal the non-streamed calls, parsing of free-form output,
and clear 400s for inconsistent requests."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from serve_helpers import local_app

from edgeacc_ray.config import ServeConfig
from edgeacc_ray.http.protocol.openai import Tool
from edgeacc_ray.http.tool_calls import HermesTools, ToolCallStream

WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": WEATHER,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"enum": ["UTC", "CET"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client():
    cfg = ServeConfig(model="tiny", served_model_name="tiny", kv_cache_memory_gb=0.05)
    with local_app(cfg) as http:
        yield openai.OpenAI(
            base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0
        )


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_enforced_calls_parse_against_the_schema(client, choice):
    r = client.chat.completions.create(
        model="tiny",
        messages=ASK,
        tools=TOOLS,
        tool_choice=choice,
        parallel_tool_calls=False,
        max_tokens=80,
        n=4,
        temperature=1.0,
        seed=1,
    )
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
        call = c.message.tool_calls[0]
        schema = (
            WEATHER if call.function.name == "get_weather" else TOOLS[1]["function"]["parameters"]
        )
        jsonschema.validate(json.loads(call.function.arguments), schema)
        if isinstance(choice, dict):
            assert call.function.name == "get_weather"


def test_round_trip_call_tool_answer_reply(client):
    first = client.chat.completions.create(
        model="tiny",
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=80,
        temperature=0,
    )
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    reply = client.chat.completions.create(
        model="tiny",
        messages=messages,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=8,
        temperature=0,
    )
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason in (
        "stop",
        "length",
    )
    assert (
        reply.usage.prompt_tokens > first.usage.prompt_tokens
    )  # the call and its answer are in the prompt


def test_streamed_tool_calls_equal_the_non_streamed(client):
    kw = dict(
        model="tiny",
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        max_tokens=80,
        temperature=0,
    )
    full = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(**kw, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(tc.function.name, tc.function.arguments) for tc in calls] == [
        (tc.function.name, tc.function.arguments) for tc in full.message.tool_calls
    ]
    assert [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ] == ["tool_calls"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS + TOOLS[:1]}, "tools"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
            "tools.0.function.name",
        ),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
    ],
)
def test_inconsistent_tool_requests_are_400(client, body, param):
    req = {"model": "tiny", "messages": ASK, "max_tokens": 4, "tools": TOOLS, **body}
    r = client._client.post("/v1/chat/completions", json=req)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    named_without_tools = {
        "model": "tiny",
        "messages": ASK,
        "tool_choice": {"type": "function", "function": {"name": "x"}},
    }
    assert client._client.post("/v1/chat/completions", json=named_without_tools).status_code == 400


def test_parse_free_form_output():
    tools = HermesTools([Tool.model_validate(t) for t in TOOLS], "auto", parallel=True)
    text = (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "C"}}\n</tool_call>'
        '\n<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'
        '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>'
    )
    content, calls = tools.parse(text)
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Rome", "unit": "C"}
    assert (
        content.startswith("Let me check.") and "unknown" in content
    )  # a tool not offered stays text
    assert tools.parse("no calls here") == ("no calls here", [])
    assert tools.parse("<tool_call>{not json}</tool_call>")[1] == []


def test_stream_holds_back_a_possible_call():
    stream = ToolCallStream(
        HermesTools([Tool.model_validate(t) for t in TOOLS], "auto", parallel=True)
    )
    assert stream.feed("Sure <tool") == "Sure "  # "<tool" may begin a call: held back
    assert stream.feed('_call>{"name": "get_time", ') == ""
    assert stream.feed('"arguments": {"zone": "CET"}}</tool_call>') == ""
    content, calls = stream.finish()
    assert content == "" and [c.name for c in calls] == ["get_time"]
    plain = ToolCallStream(
        HermesTools([Tool.model_validate(t) for t in TOOLS], "auto", parallel=True)
    )
    assert (
        plain.feed("a <b") == "a <b" and plain.feed("ool") == "ool" and plain.finish() == ("", [])
    )
