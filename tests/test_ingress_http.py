"""`http_server: ingress`: the Ingress replica is the HTTP endpoint itself (no Serve proxy hop), its
in-flight bound answers 429 like the proxy would, and its autoscaler sees the requests it serves."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
from conftest import SERVE_TEST_ARGS, _free_port

from deployments.autoscaling_policy import IngressScalingPolicy
from deployments.http_listener import PortTaken, bind
from edgeacc_ray.config import ServeConfig
from edgeacc_ray.http.app import http_limit
from edgeacc_ray.http.inflight import FULL_RETRY_AFTER_S, InFlight, InFlightCount

APP = "edgeacc_direct"


@pytest.fixture(scope="module")
def direct(serve_http_url):
    """One application reachable both ways: its Ingress listens on its own port, and Serve's proxy
    (the test session's) forwards `/direct` to the same replica."""
    from ray import serve
    from serve_helpers import serve_app, wait_serving

    port = _free_port()
    proxied = serve_app(
        {**SERVE_TEST_ARGS, "http_server": "ingress", "port": port}, APP, serve_http_url, "/direct"
    )
    own = f"http://127.0.0.1:{port}"
    wait_serving(own, 60)
    yield SimpleNamespace(own=own, proxied=proxied)
    serve.delete(APP)


def test_the_ingress_serves_openai_requests_on_its_own_port(direct):
    """The official client, streaming and not, straight to the replica; greedy output is the one
    the proxy path gives for the same request."""
    texts = {}
    for name, base in (("own", direct.own), ("proxied", direct.proxied)):
        client = openai.OpenAI(base_url=base + "/v1", api_key="none")
        r = client.completions.create(
            model="tiny", prompt="one two three", max_tokens=8, temperature=0
        )
        stream = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=8,
            temperature=0,
            stream=True,
        )
        chat = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        texts[name] = (r.choices[0].text, chat)
    assert texts["own"] == texts["proxied"]
    assert texts["own"][0] and texts["own"][1]
    metrics = httpx.get(direct.own + "/metrics", timeout=10)
    assert metrics.status_code == 200 and "edgeacc" in metrics.text


def test_the_autoscaler_sees_requests_served_on_the_own_port(direct):
    from ray import serve

    handle = serve.get_deployment_handle("Ingress", APP)
    assert handle.record_autoscaling_stats.remote().result() == {"http_requests": 0.0}
    body = {"model": "tiny", "prompt": "a", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", direct.own + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # held: a dropped iterator closes the stream (a disconnect)
        next(lines)
        assert handle.record_autoscaling_stats.remote().result() == {"http_requests": 1.0}
    deadline = time.monotonic() + 10
    while handle.record_autoscaling_stats.remote().result() != {"http_requests": 0.0}:
        assert time.monotonic() < deadline, "the disconnected stream is still counted"
        time.sleep(0.1)


def test_a_port_held_without_sharing_is_refused_with_the_fix():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        with pytest.raises(PortTaken, match="proxy_location: Disabled"):
            bind("127.0.0.1", port)
    finally:
        holder.close()


def test_ingress_replicas_share_the_port():
    first = bind("127.0.0.1", _free_port())
    try:
        second = bind("127.0.0.1", first.getsockname()[1])  # a second replica on the node
        second.close()
    finally:
        first.close()


def test_the_bound_is_what_the_proxy_would_have_let_through():
    cfg = ServeConfig(http_server="ingress", ingress_max_ongoing_requests=3)
    assert http_limit(cfg) == 3 + cfg.ingress_max_queued_requests
    assert http_limit(ServeConfig(http_server="ingress", ingress_max_queued_requests=-1)) is None
    assert http_limit(ServeConfig()) is None  # behind Serve's proxy, the proxy bounds the replica


async def test_over_the_bound_a_request_gets_429_and_probes_still_answer():
    release = asyncio.Event()

    async def app(scope, receive, send):  # holds every request until released
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    count = InFlightCount(limit=1)
    guarded = InFlight(app, count)

    async def call(path: str) -> list[dict]:
        sent: list[dict] = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b""}

        await guarded({"type": "http", "path": path}, receive, send)
        return sent

    first = asyncio.create_task(call("/v1/completions"))
    await asyncio.sleep(0.01)
    assert count.value == 1
    refused = await call("/v1/completions")
    assert refused[0]["status"] == 429
    assert (b"retry-after", str(FULL_RETRY_AFTER_S).encode()) in refused[0]["headers"]
    assert json.loads(refused[1]["body"])["error"]["code"] == "overloaded"
    probe = asyncio.create_task(call("/health"))  # not counted, not refused
    await asyncio.sleep(0.01)
    release.set()
    assert (await probe)[0]["status"] == 200
    assert (await first)[0]["status"] == 200
    assert count.value == 0


def test_ingress_policy_scales_on_requests_in_flight():
    policy = IngressScalingPolicy(target_per_replica=256)

    def ctx(n: int, counts: list[float] | None):
        metrics = {} if counts is None else {"http_requests": dict(enumerate(counts))}
        return SimpleNamespace(
            current_num_replicas=n,
            target_num_replicas=n,
            aggregated_metrics=metrics,
            policy_state={},
        )

    assert policy(ctx(1, None))[0] == 1  # no reports yet
    assert policy(ctx(1, [300.0]))[0] == 2
    assert policy(ctx(2, [40.0, 30.0]))[0] == 1
    assert policy(ctx(2, [0.0, 0.0]))[0] == 1
