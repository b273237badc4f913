"""Faults on a real Ray cluster over real HTTP (issue 13): a killed engine gives clean errors and
503 + Retry-After (health included) until it is back; a killed Ingress's requests are aborted by the
engine; a client that leaves aborts all of its request's engine work; counters survive an Ingress
restart."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest
from serve_helpers import record_stream, replica_pid, serve_app, wait_serving

APP = "edgeacc_faults"
ARGS = {
    "model": "tiny",
    "served_model_name": "tiny",
    "num_threads": 1,  # one core each: the suite's replicas share two
    "kv_cache_memory_gb": 0.25,
    "stream_interval": 4,
}
LONG = {"max_tokens": 1900, "ignore_eos": True}


@pytest.fixture(scope="module")
def url(serve_http_url) -> str:
    from ray import serve

    yield serve_app(ARGS, APP, serve_http_url, "/faults")
    serve.delete(APP)


def engine_stats():
    """The engine's own counters, through its handle (not through the Ingress, which may be down)."""
    from ray import serve

    return (
        serve.get_deployment_handle("EngineServer", app_name=APP)
        .stats.remote()
        .result(timeout_s=30)
    )


def start_streams(base: str, count: int) -> tuple[list[threading.Thread], dict]:
    results: dict = {}
    threads = [
        threading.Thread(
            target=record_stream,
            args=(
                base,
                "/v1/completions",
                {"model": "tiny", "prompt": f"story {i}", **LONG},
                results,
                str(i),
            ),
        )
        for i in range(count)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while engine_stats().num_running < count:
        assert time.monotonic() < deadline, "the streams did not start"
        time.sleep(0.1)
    return threads, results


def counter(base: str, name: str) -> float:
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{"):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_client_leaving_aborts_all_of_its_requests_engine_work(url):
    before = engine_stats()
    body = {"model": "tiny", "prompt": ["a", "b", "c", "d"], "n": 8, **LONG}  # 32 engine requests
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, timeout=2.0)  # the client gives up
    deadline = time.monotonic() + 10
    while (s := engine_stats()).num_running or s.num_waiting:
        assert time.monotonic() < deadline, (
            f"work continued after the client left: {s.num_running} running"
        )
        time.sleep(0.1)
    assert s.requests_aborted_total - before.requests_aborted_total == 32
    assert s.num_free_pages + s.num_cached_pages >= s.num_total_pages


def test_killed_ingress_work_is_aborted_and_counters_do_not_reset(url):
    wait_serving(url, 60)
    requests_before = counter(url, "sglang:num_requests_total")
    aborted_before = engine_stats().requests_aborted_total
    threads, results = start_streams(url, 4)
    os.kill(replica_pid(APP, "Ingress"), signal.SIGKILL)
    started = time.monotonic()
    while engine_stats().num_running:  # the engine notices its caller is gone (lease) and aborts
        assert time.monotonic() - started < 15, "the dead Ingress's requests kept running"
        time.sleep(0.2)
    assert engine_stats().requests_aborted_total - aborted_before == 4
    for t in threads:
        t.join(60)
    assert all(error is not None for _, error in results.values())  # cut off, none completed
    wait_serving(url, 120)
    assert (
        counter(url, "sglang:num_requests_total") >= requests_before + 4
    )  # not reset by the restart


def test_killed_engine_gives_503_with_retry_after_until_it_is_back(url):
    wait_serving(url, 60)
    threads, results = start_streams(url, 3)
    os.kill(replica_pid(APP, "EngineServer"), signal.SIGKILL)
    for t in threads:
        t.join(60)
    for _tokens, error in results.values():  # every stream ended with a short, clean error event
        assert (
            error is not None
            and "Actor" not in error
            and "pid" not in error.lower()
            and "ip=" not in error
        )
    health = httpx.get(url + "/health", timeout=10)
    r = httpx.post(
        url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}, timeout=10
    )
    if r.status_code != 200:  # unless the engine is already back: refused at once, not queued
        assert health.status_code == 503 and r.status_code == 503 and "retry-after" in r.headers
        assert r.json()["error"]["code"] in ("engine_unavailable", "not_ready")
    wait_serving(url, 120)
    assert httpx.get(url + "/health", timeout=10).status_code == 200
