"""API key, body-size limit and not-ready answers, on a second application whose engine cannot be
placed (it asks for a Ray resource no node has), so its Ingress stays up with the engine pending."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

KEY = "sk-edgeacc-test"


@pytest.fixture(scope="module")
def pending_url(serve_http_url):
    from ray import serve

    from deployments.app import build_app

    app = build_app(
        {
            "model": "tiny",
            "served_model_name": "tiny",
            "api_key": KEY,
            "max_request_body_bytes": 4096,
            "engine_resources": {"edgeacc_test_unavailable": 1},
        }
    )
    serve._run(app, name="edgeacc_pending", route_prefix="/pending", _blocking=False)
    url = serve_http_url + "/pending"
    deadline = time.monotonic() + 60
    while True:  # wait for the Ingress (the engine never comes)
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 503:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the pending application's Ingress did not come up"
        time.sleep(0.2)
    yield url
    serve.delete("edgeacc_pending", _blocking=False)


def _err(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_missing_and_wrong_api_key_are_401(pending_url):
    err = _err(httpx.post(pending_url + "/v1/chat/completions", json=BODY, timeout=10), 401)
    assert err["code"] == "invalid_api_key"
    _err(
        httpx.post(
            pending_url + "/v1/chat/completions",
            json=BODY,
            timeout=10,
            headers={"Authorization": "Bearer wrong"},
        ),
        401,
    )
    _err(httpx.post(pending_url + "/generate", json={"text": "x"}, timeout=10), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=pending_url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_not_ready_is_503_with_retry_after(pending_url):
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(pending_url + "/v1/chat/completions", json=BODY, headers=auth, timeout=10)
    err = _err(r, 503)
    assert "not ready" in err["message"] and "retry-after" in r.headers
    _err(httpx.post(pending_url + "/generate", json={"text": "x"}, headers=auth, timeout=10), 503)
    assert (
        httpx.get(pending_url + "/health", timeout=10).status_code == 503
    )  # no key needed for /health
    metrics = httpx.get(pending_url + "/metrics", timeout=10)  # nor for /metrics
    assert metrics.status_code == 200 and "sglang:time_to_first_token_seconds" in metrics.text


def test_request_body_limit_is_413(pending_url):
    auth = {"Authorization": f"Bearer {KEY}"}
    big = {**BODY, "messages": [{"role": "user", "content": "x" * 10_000}]}
    err = _err(
        httpx.post(pending_url + "/v1/chat/completions", json=big, headers=auth, timeout=10), 413
    )
    assert "4096" in err["message"]

    def chunks():  # no Content-Length: the limit applies while reading
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    _err(
        httpx.post(
            pending_url + "/v1/completions",
            content=chunks(),
            timeout=10,
            headers={**auth, "Content-Type": "application/json"},
        ),
        413,
    )
