"""Constrained decoding (llguidance) and the logit controls: outputs always match their JSON schema,
regex or EBNF grammar, colocated and across Semi-PD's prefill->decode handoff; bad grammars are
refused with the reason; `min_tokens` and `logit_bias` act; and the official openai client's
structured-output parse works against the HTTP app."""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest
from serve_helpers import local_app

from edgeacc_ray import LLM, SamplingParams
from edgeacc_ray.config import SemiPDConfig, ServeConfig
from edgeacc_ray.engine.request import InvalidRequest, StructuredOutput

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "age", "tags"],
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
}
PROMPTS = [f"Describe person number {i} as JSON:" for i in range(24)]


@pytest.fixture(scope="module")
def llm():
    with LLM("tiny", dtype="float32", kv_cache_memory_gb=0.05) as engine:
        yield engine


def constrained(kind: str, spec: str = "", **kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 120, **kw}, structured=StructuredOutput(kind, spec))


def test_json_schema_output_always_validates(llm):
    params = [
        constrained("json_schema", json.dumps(SCHEMA), temperature=1.0, seed=i)
        for i in range(len(PROMPTS))
    ]
    outs = llm.generate(PROMPTS, params)
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_regex_ebnf_and_json_object(llm):
    [yes_no] = llm.generate(["Answer:"], constrained("regex", r"(yes|no)\.", temperature=0))
    assert re.fullmatch(r"(yes|no)\.", yes_no.text) and yes_no.finish_reason == "stop"
    [ebnf] = llm.generate(
        ["Pick:"], constrained("ebnf", 'root ::= "red" | "green" | "blue"', temperature=0.9, seed=3)
    )
    assert ebnf.text in ("red", "green", "blue")
    [obj] = llm.generate(["{"], constrained("json_object", temperature=0.7, seed=1, max_tokens=200))
    if obj.finish_reason == "stop":
        assert isinstance(json.loads(obj.text), dict)


def test_constrained_rows_do_not_change_unconstrained_ones(llm):
    free = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    alone = llm.generate(PROMPTS[:3], free)
    mixed = llm.generate(
        PROMPTS[:3] + PROMPTS[3:6],
        [free] * 3 + [constrained("regex", "[0-9]{4}", temperature=0)] * 3,
    )
    assert [o.token_ids for o in mixed[:3]] == [o.token_ids for o in alone]
    assert all(re.fullmatch("[0-9]{4}", o.text) for o in mixed[3:])


@pytest.mark.parametrize(
    "kind, spec, words",
    [
        ("json_schema", "{not json", "json_schema"),
        ("json_schema", '{"type": "objectx"}', "objectx"),
        ("regex", "a(", "regex"),
        ("lark", "start: (", "lark"),
    ],
)
def test_bad_grammars_are_refused_with_the_reason(llm, kind, spec, words):
    with pytest.raises(InvalidRequest) as info:
        llm.generate(["x"], constrained(kind, spec))
    assert info.value.field == "structured" and words in str(info.value)


def test_min_tokens_and_logit_bias(llm):
    eos = min(llm.engine.eos_token_ids)
    [forced_eos] = llm.generate(
        ["x"], SamplingParams(max_tokens=10, temperature=0, logit_bias={eos: 100.0})
    )
    assert forced_eos.token_ids == [eos]
    [held] = llm.generate(
        ["x"], SamplingParams(max_tokens=10, temperature=0, logit_bias={eos: 100.0}, min_tokens=4)
    )
    assert len(held.token_ids) == 5 and eos not in held.token_ids[:4] and held.token_ids[4] == eos
    with pytest.raises(InvalidRequest, match="logit_bias"):
        llm.generate(["x"], SamplingParams(logit_bias={10**6: 1.0}))


def leaves(spec: str, **kw) -> SamplingParams:
    """A regex the output ends where the model leaves."""
    return SamplingParams(
        **{"max_tokens": 24, "temperature": 0, **kw},
        structured=StructuredOutput("regex", spec, end_when_left=True),
    )


def test_a_grammar_the_model_leaves_ends_there(llm):
    """end_when_left: the greedy output is the masked one up to the first point where the grammar
    could end and the model's own choice is outside it; the end token comes there instead."""
    strict = llm.generate(
        PROMPTS[:6], constrained("regex", "[a-z ]*", temperature=0, max_tokens=24)
    )
    left = llm.generate(PROMPTS[:6], leaves("[a-z ]*"))
    eos = llm.engine.eos_token_ids
    for s, out in zip(strict, left):
        *kept, end = out.token_ids
        assert out.finish_reason == "stop" and end in eos and s.finish_reason == "length"
        assert kept == s.token_ids[: len(kept)] and len(kept) < len(s.token_ids)
    assert any(not o.text for o in left)  # some leave at once: the first token ends them
    held = llm.generate(PROMPTS[:6], leaves("[a-z ]*", min_tokens=3))
    for s, out in zip(strict, held):  # min_tokens holds the end back, under the mask
        assert out.token_ids[:3] == s.token_ids[:3]


def test_semi_pd_constrained_output_equals_colocated(llm):
    """The prefill process samples the first token under the mask the decode side sends it (and
    ends a grammar the model leaves at once)."""
    params = [constrained("json_schema", json.dumps(SCHEMA), temperature=0)] * 4 + [
        leaves("[a-z ]*")
    ] * 6
    expected = llm.generate(PROMPTS[:4] + PROMPTS[:6], params)
    with LLM(
        "tiny",
        dtype="float32",
        kv_cache_memory_gb=0.05,
        semi_pd=SemiPDConfig(prefill_batch_tokens=64),
    ) as spd:
        got = spd.generate(PROMPTS[:4] + PROMPTS[:6], params)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    for out in got[:4]:
        jsonschema.validate(json.loads(out.text), SCHEMA)


# ---- over HTTP, with the openai client -----------------------------------------------------------


class Answer(pydantic.BaseModel):
    city: Literal["Paris", "Rome", "Oslo"]
    sure: bool
    score: int = pydantic.Field(ge=0, le=9)


@pytest.fixture(scope="module")
def client():
    cfg = ServeConfig(model="tiny", served_model_name="tiny", kv_cache_memory_gb=0.05)
    with local_app(cfg) as http:
        yield (
            openai.OpenAI(
                base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0
            ),
            http,
        )


def test_openai_parse_returns_the_pydantic_object(client):
    oai, _ = client
    messages = [{"role": "user", "content": "Which city is the capital of France?"}]
    r = oai.chat.completions.parse(
        model="tiny",
        messages=messages,
        response_format=Answer,
        max_tokens=60,
        n=3,
        temperature=1.0,
        seed=5,
    )
    for choice in r.choices:
        assert isinstance(choice.message.parsed, Answer)


def test_streaming_json_reassembles_to_the_non_streaming_result(client):
    oai, _ = client
    kw = dict(
        model="tiny",
        messages=[{"role": "user", "content": "JSON please"}],
        max_tokens=120,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "p", "schema": SCHEMA, "strict": True},
        },
    )
    full = oai.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in oai.chat.completions.create(**kw, stream=True)
        if c.choices
    )
    assert streamed == full
    jsonschema.validate(json.loads(full), SCHEMA)


def test_sglang_generate_regex_and_bad_ebnf(client):
    _, http = client
    r = http.post(
        "/generate",
        json={
            "text": "Year:",
            "sampling_params": {"regex": "(19|20)[0-9]{2}", "max_new_tokens": 8, "temperature": 0},
        },
    )
    assert r.status_code == 200 and re.fullmatch("(19|20)[0-9]{2}", r.json()["text"])
    r = http.post(
        "/generate",
        json={"text": "x", "sampling_params": {"ebnf": "root ::= (", "max_new_tokens": 4}},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "sampling_params.ebnf"
    r = http.post(
        "/generate", json={"text": "x", "sampling_params": {"regex": "a", "ebnf": 'root ::= "a"'}}
    )
    assert r.status_code == 400
