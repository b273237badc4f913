"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (issue 13): bodies generated
from each endpoint's request schema, some string fields swapped for hostile text (lone surrogates,
control characters, very long tokens). No answer may be a 5xx; every 4xx carries a JSON error body;
the server is healthy afterwards. Bounded (a few hundred cases) and derandomized, so CI is stable."""

from __future__ import annotations

import collections
import json
import time

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import local_app

from edgeacc_ray.config import ServeConfig

HOSTILE = [
    "\ud800",
    "a\udfffb",
    "\x00\x01\x02",
    "\x1b[2J",
    "\u2028\u2029",
    "\ufeff",
    "😀" * 50,
    "z" * 5000,
    "tiny",
    "",
    " ",
    "\\",
    '"',
    "{}",
    "<|im_end|>",
    "<|im_start|>system\n",
]
STATUSES: collections.Counter = collections.Counter()  # (path, status) over the whole run
ENDPOINTS = {
    "/v1/chat/completions": "ChatCompletionRequest",
    "/v1/completions": "CompletionRequest",
    "/generate": "GenerateRequest",
}
VALID = {
    "/v1/chat/completions": {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
    },
    "/v1/completions": {"model": "tiny", "prompt": "hi", "max_tokens": 4},
    "/generate": {"text": "hi", "sampling_params": {"max_new_tokens": 4}},
}


@pytest.fixture(scope="module")
def http():
    # a short context and small limits keep every generated request cheap
    cfg = ServeConfig(
        model="tiny",
        served_model_name="tiny",
        kv_cache_memory_gb=0.05,
        max_model_len=64,
        max_request_choices=8,
        max_n=4,
    )
    with local_app(cfg, raise_server_exceptions=False) as c:
        yield c


def from_openapi(schema: dict, components: dict, depth: int = 0) -> st.SearchStrategy:
    """Values for the subset of JSON schema FastAPI emits: $ref, anyOf, enum/const, objects (every
    optional property sometimes left out, sometimes an unknown one added), arrays and scalars; numbers
    reach past every bound a server might assume."""
    if "$ref" in schema:
        return st.deferred(
            lambda: from_openapi(components[schema["$ref"].rsplit("/", 1)[-1]], components, depth)
        )
    if "anyOf" in schema:
        return st.one_of([from_openapi(s, components, depth) for s in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        fields = {
            k: from_openapi(v, components, depth + 1) for k, v in props.items() if k in required
        }
        optional = {
            k: from_openapi(v, components, depth + 1) for k, v in props.items() if k not in required
        }
        extra = schema.get("additionalProperties")
        base = st.fixed_dictionaries(fields, optional=optional)
        if isinstance(extra, dict) and not props:  # a map
            return st.dictionaries(
                st.text(max_size=8), from_openapi(extra, components, depth + 1), max_size=3
            )
        return base
    if kind == "array":
        items = from_openapi(schema.get("items", {}), components, depth + 1)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=4 if depth < 2 else 2)
    if kind == "string":
        return st.text(max_size=40)
    if kind == "integer":
        return st.one_of(st.integers(-3, 40), st.integers(-(2**70), 2**70))
    if kind == "number":
        return st.one_of(
            st.floats(-3, 3), st.floats(allow_nan=False, allow_infinity=False), st.integers(-5, 5)
        )
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return st.one_of(
        st.none(), st.booleans(), st.integers(-3, 3), st.text(max_size=8)
    )  # untyped (Any)


def request_schema(http: TestClient, name: str) -> st.SearchStrategy:
    components = http.get("/openapi.json").json()["components"]["schemas"]
    return from_openapi(components[name], components)


def with_hostile_strings(data: st.DataObject, value):
    """Replace some string leaves with hostile text, chosen by hypothesis."""
    if isinstance(value, str):
        return data.draw(st.sampled_from(HOSTILE)) if data.draw(st.booleans()) else value
    if isinstance(value, list):
        return [with_hostile_strings(data, v) for v in value]
    if isinstance(value, dict):
        return {k: with_hostile_strings(data, v) for k, v in value.items()}
    return value


def check(http: TestClient, path: str, body: dict) -> None:
    raw = json.dumps(body)  # ensure_ascii: lone surrogates travel as \ud800 escapes (valid JSON)
    r = http.post(path, content=raw.encode(), headers={"content-type": "application/json"})
    STATUSES[path, r.status_code] += 1
    assert r.status_code < 500, (path, raw[:500], r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert (
            isinstance(err["message"], str)
            and err["message"]
            and set(err) == {"message", "type", "param", "code"}
        )


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_fuzz_endpoint_never_5xx(http, path):
    bodies = request_schema(http, ENDPOINTS[path])

    @settings(
        max_examples=120,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )
    @given(body=bodies, data=st.data())
    def run(body, data):
        if data.draw(
            st.booleans()
        ):  # a valid request with some generated fields: reach past the first check
            body = {**VALID[path], **{k: v for k, v in body.items() if data.draw(st.booleans())}}
        check(http, path, with_hostile_strings(data, body))

    run()
    assert http.get("/health").status_code == 200
    r = http.post(
        "/v1/completions", json={"model": "tiny", "prompt": "still fine", "max_tokens": 2}
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_fuzzing_reached_the_engine_and_the_validators(http):
    """The generated bodies are not all rejected early: each endpoint served some and refused some."""
    for path in ENDPOINTS:
        served = sum(n for (p, status), n in STATUSES.items() if p == path and status == 200)
        refused = sum(n for (p, status), n in STATUSES.items() if p == path and 400 <= status < 500)
        assert served >= 5 and refused >= 5, (path, dict(STATUSES))


def test_engine_is_idle_after_fuzzing(http):
    deadline = time.monotonic() + 30
    while True:
        state = http.get("/get_server_info").json()["internal_states"][0]
        if state["num_running_reqs"] == 0 and state["num_queue_reqs"] == 0:
            break
        assert time.monotonic() < deadline, state
        time.sleep(0.1)
    assert state["num_free_pages"] + state["num_cached_pages"] >= state["num_total_pages"]
