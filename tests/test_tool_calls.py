"""Tool calling in /v1/chat/completions (Hermes / Qwen format) with the official openai client on the
ASGI app: enforced calls always parse against the function's schema, a full round trip (call -> tool
answer -> reply), streamed tool-call deltas equal the non-streamed calls, parsing of free-form output,
and clear 400s for inconsistent requests. On the default model, a forced call ends once it is whole
(`finish_reason` "tool_calls"), and one cut by max_tokens says "length" and is not returned as a call."""

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


# The default model's task from the issue it came from: one tool, `unit` an enum, three cities.
FORECAST = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
FORECAST_TOOL = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": FORECAST,
        },
    }
]


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


# ---- the default model (SmolLM2-135M-Instruct), float32 for a reproducible greedy answer ----------


@pytest.fixture(scope="module")
def default_model():
    with local_app(ServeConfig(dtype="float32", kv_cache_memory_gb=0.1)) as http:
        client = openai.OpenAI(
            base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0
        )
        yield client, client.models.list().data[0].id


def _ask_weather(default_model, city: str, stream: bool, **kw) -> tuple[str, list, str | None]:
    """(finish_reason, [(name, arguments)], content) of one answer, streamed or not."""
    client, model = default_model
    req = {
        "model": model,
        "messages": [{"role": "user", "content": f"What is the weather in {city}?"}],
        "tools": FORECAST_TOOL,
        "tool_choice": "required",
        "max_tokens": 80,
        "temperature": 0,
        **kw,
    }
    if not stream:
        choice = client.chat.completions.create(**req).choices[0]
        calls = choice.message.tool_calls or []
        return (
            choice.finish_reason,
            [(c.function.name, c.function.arguments) for c in calls],
            choice.message.content,
        )
    chunks = [c for c in client.chat.completions.create(**req, stream=True) if c.choices]
    [finish] = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    return finish, [(c.function.name, c.function.arguments) for c in calls], content or None


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("parallel", [None, False])
def test_the_default_models_required_call_finishes(default_model, stream, parallel):
    """The model's greedy answer ends after its first call (it leaves the grammar there) instead of
    being forced into more calls until max_tokens."""
    kw = {} if parallel is None else {"parallel_tool_calls": parallel}
    for city in ("Paris", "Tokyo", "Lima"):
        finish, calls, content = _ask_weather(default_model, city, stream, **kw)
        assert finish == "tool_calls" and content is None and len(calls) == 1, (city, calls)
        name, arguments = calls[0]
        args = json.loads(arguments)
        jsonschema.validate(args, FORECAST)
        assert name == "get_weather" and args["city"].lower() == city.lower()


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_cut_by_max_tokens_says_length(default_model, stream):
    finish, calls, content = _ask_weather(default_model, "Paris", stream, max_tokens=12)
    assert finish == "length" and calls == []
    assert content.startswith("<tool_call>")  # the cut text, not a call
