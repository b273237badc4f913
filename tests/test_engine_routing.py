"""Several engine replicas behind one Ingress (issues 9 and 10): the router pins each Ingress's output
stream, lease and aborts to the replica that runs its requests, places new requests by prompt prefix
within a load bound, and the autoscaling policy scales replicas on waiting requests, KV and TTFT."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from serve_helpers import record_stream, serve_app

from deployments.autoscaling_policy import EngineScalingPolicy, autoscaling_signals
from deployments.engine_router import AFFINE_ATTEMPTS, EngineRouter, PrefixAffinity
from edgeacc_ray.config import ConfigError, ServeConfig
from edgeacc_ray.engine.request import EngineStats, LatencyMetrics, combine_stats
from edgeacc_ray.prefix_keys import page_key

# ---- pieces, without Ray ------------------------------------------------------------------------


def test_prefix_affinity_uses_the_prefix_caches_keys_and_finds_the_deepest_owner():
    affinity = PrefixAffinity(page_size=4, max_pages=8, capacity=100)
    prompt = list(range(10))
    keys = affinity.keys(prompt)
    assert len(keys) == 2  # full pages only
    assert keys[1] == page_key(page_key(b"", prompt[:4]), prompt[4:8])
    affinity.record(keys[:1], "a")
    affinity.record(keys, "b")
    assert affinity.longest_owner(keys, {"a", "b"}) == ("b", 2)
    assert affinity.longest_owner(keys, {"a"}) == (None, 0)  # b's record replaced a's for page 1
    assert affinity.longest_owner(affinity.keys([9] * 8), {"a", "b"}) == (None, 0)
    affinity.forget("b")
    assert affinity.longest_owner(keys, {"a", "b"}) == (None, 0)


def test_prefix_affinity_stays_within_its_capacity():
    affinity = PrefixAffinity(page_size=2, max_pages=4, capacity=5)
    for i in range(10):
        affinity.record(affinity.keys([i, i, i, i]), f"r{i}")
    assert affinity.longest_owner(affinity.keys([9, 9, 9, 9]), {"r9"}) == ("r9", 2)
    assert affinity.longest_owner(affinity.keys([0, 0, 0, 0]), {"r0"}) == (
        None,
        0,
    )  # evicted, oldest first


def test_the_router_waits_a_few_attempts_for_the_replica_that_holds_the_prefix():
    """A replica whose queue-length probe is slow is skipped by Serve for that attempt; the prefix's owner is
    offered alone for the first attempts, then with the rest behind it."""
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
    from ray.serve.request_router import PendingRequest

    router = EngineRouter(
        DeploymentID(name="EngineServer", app_name="routing_unit"), DeploymentHandleSource.UNKNOWN
    )
    router.initialize_state(page_size=4)
    owner, other = (
        SimpleNamespace(replica_id=SimpleNamespace(unique_id=u), routing_stats={"load": 0})
        for u in ("owner", "other")
    )
    prompt = list(range(12))
    router.affinity.record(router.affinity.keys(prompt), "owner")

    def pending(request_id: str, tokens: list[int]) -> PendingRequest:
        return PendingRequest(
            args=["caller", request_id, tokens],
            kwargs={},
            metadata=RequestMetadata(
                request_id=request_id, internal_request_id=request_id, call_method="submit"
            ),
        )

    async def route() -> None:  # a PendingRequest needs a running loop
        request = pending("r1", prompt + [99])
        ranks = [
            await router.choose_replicas([other, owner], request)
            for _ in range(AFFINE_ATTEMPTS + 1)
        ]
        assert all(r == [[owner]] for r in ranks[:AFFINE_ATTEMPTS]), ranks
        assert ranks[-1] == [[owner], [other]]
        router.on_request_routed(request, owner.replica_id, None)
        assert router._attempts == {} and router._keys == {}
        # A prompt nobody holds is ranked by load at once.
        assert len(await router.choose_replicas([other, owner], pending("r2", [50] * 12))) == 2

    asyncio.run(route())


def _stats(**kw) -> EngineStats:
    base = dict(
        num_running=0,
        num_waiting=0,
        num_free_pages=100,
        num_total_pages=100,
        page_size=16,
        num_cached_pages=0,
        prompt_tokens_total=0,
        generation_tokens_total=0,
        cached_prompt_tokens_total=0,
        requests_finished_total=0,
        requests_aborted_total=0,
    )
    return EngineStats(**{**base, **kw})


def test_autoscaling_policy_scales_up_under_pressure_and_down_only_when_the_rest_carry_the_load():
    policy = EngineScalingPolicy(
        target_waiting_per_replica=2, kv_high=0.8, kv_low=0.5, ttft_slo_s=1.0
    )

    def signals(waiting, kv, ttft):
        return {
            "waiting": waiting,
            "running": [1.0] * len(waiting),
            "kv_reserved": kv,
            "ttft_s": ttft,
        }

    assert policy.desired(1, signals([3.0], [0.1], [0.1])) == 2  # waiting
    assert policy.desired(1, signals([0.0], [0.9], [0.1])) == 2  # KV reserved
    assert policy.desired(1, signals([0.0], [0.1], [1.5])) == 2  # TTFT over its target
    assert (
        policy.desired(2, signals([0.0, 0.0], [0.1, 0.2], [0.1, 0.1])) == 1
    )  # 0.3 of one replica's KV
    assert (
        policy.desired(2, signals([0.0, 0.0], [0.3, 0.3], [0.1, 0.1])) == 2
    )  # 0.6 > kv_low on one
    assert policy.desired(2, signals([1.0, 0.0], [0.1, 0.1], [0.1, 0.1])) == 2  # someone waits
    assert policy.desired(2, signals([0.0, 0.0], [0.1, 0.1], [0.7, 0.1])) == 2  # TTFT not calm
    assert policy.desired(1, signals([0.0], [0.0], [0.0])) == 1
    with pytest.raises(ValueError):
        EngineScalingPolicy(kv_low=0.9, kv_high=0.5)


def test_autoscaling_signals_report_ttft_of_the_window_since_the_last_report():
    latency = LatencyMetrics()
    latency.token(arrival=0.0, first=None, previous=None, now=2.0)
    first = autoscaling_signals(
        _stats(num_waiting=3, reserved_pages=40, latency=latency.snapshot())
    )
    assert first["waiting"] == 3 and first["kv_reserved"] == pytest.approx(0.4)
    latency.token(arrival=0.0, first=None, previous=None, now=0.5)
    assert autoscaling_signals(_stats(latency=latency.snapshot()))["ttft_s"] == pytest.approx(0.5)
    assert autoscaling_signals(_stats(latency=latency.snapshot()))["ttft_s"] == 0.0  # nothing new


def test_combined_stats_add_loads_and_merge_histograms():
    a_lat, b_lat = LatencyMetrics(), LatencyMetrics()
    a_lat.token(0.0, None, None, 0.05)
    b_lat.token(0.0, None, None, 3.0)
    a = _stats(
        num_running=2,
        num_free_pages=50,
        prompt_tokens_total=100,
        cached_prompt_tokens_total=50,
        new_token_ratio=0.5,
        latency=a_lat.snapshot(),
    )
    b = _stats(
        num_running=6,
        num_free_pages=100,
        prompt_tokens_total=100,
        cached_prompt_tokens_total=0,
        new_token_ratio=0.1,
        latency=b_lat.snapshot(),
    )
    both = combine_stats([a, b])
    assert both.num_running == 8 and both.num_total_pages == 200 and both.page_size == 16
    assert both.kv_usage == pytest.approx(0.25) and both.cache_hit_rate == pytest.approx(0.25)
    assert both.new_token_ratio == pytest.approx((0.5 * 2 + 0.1 * 6) / 8)
    assert sum(both.latency.ttft.counts) == 2 and both.latency.ttft.sum == pytest.approx(3.05)


def test_replica_settings_nest_and_refuse_what_cannot_work():
    cfg = ServeConfig.from_sources({"engine_replicas": 3}, env={})
    assert (cfg.engine_replicas.min_replicas, cfg.engine_replicas.max_replicas) == (3, 3)
    assert cfg.engine_replicas.serve_options() == {"num_replicas": 3}
    cfg = ServeConfig.from_sources(
        {}, env={"EDGEACC_ENGINE_REPLICAS": '{"min_replicas": 1, "max_replicas": 4}'}
    )
    options = cfg.engine_replicas.serve_options(2.0)["autoscaling_config"]
    assert options["max_replicas"] == 4 and options["policy"]["policy_kwargs"]["ttft_slo_s"] == 2.0
    with pytest.raises(ConfigError, match="max_replicas"):
        ServeConfig.from_sources(
            {"engine_replicas": {"min_replicas": 3, "max_replicas": 2}}, env={}
        )
    with pytest.raises(ConfigError, match="engine_replicas"):
        ServeConfig.from_sources(
            {"pd_mode": "semi_pd", "engine_replicas": {"max_replicas": 2}}, env={}
        )


# ---- on a real Ray cluster ----------------------------------------------------------------------

ARGS = {
    "model": "tiny",
    "served_model_name": "tiny",
    "num_threads": 1,  # one core each: the suite's replicas share two
    "kv_cache_memory_gb": 0.05,
    "stream_interval": 4,
}


def _replica_counts(app: str, deployment: str) -> dict[str, int]:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return {str(k): v for k, v in status.replica_states.items()}


def _running(app: str, deployment: str) -> int:
    return _replica_counts(app, deployment).get("RUNNING", 0)


def _per_replica_stats(app: str) -> dict[str, EngineStats]:
    from ray import serve

    from deployments.replica_registry import known_replicas

    handle = serve.get_deployment_handle("EngineServer", app_name=app)
    handle.model_info.remote().result(timeout_s=30)  # the router learns the replicas
    deadline = time.monotonic() + 30
    while len(known_replicas(app, "EngineServer")) < _running(app, "EngineServer"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return {
        r: handle.stats.remote(replica=r).result(timeout_s=30)
        for r in known_replicas(app, "EngineServer")
    }


@pytest.fixture(scope="module")
def two_replicas(serve_http_url):
    from ray import serve

    app = "edgeacc_two_engines"
    yield app, serve_app({**ARGS, "engine_replicas": 2}, app, serve_http_url, "/two")
    serve.delete(app)


def test_requests_spread_over_two_replicas_and_every_stream_completes(two_replicas):
    app, url = two_replicas
    before = {r: s.requests_finished_total for r, s in _per_replica_stats(app).items()}
    results: dict = {}
    threads = [
        threading.Thread(
            target=record_stream,
            args=(
                url,
                "/v1/completions",
                {
                    "model": "tiny",
                    "prompt": f"request {i} " * (i + 1),
                    "max_tokens": 40,
                    "ignore_eos": True,
                },
                results,
                str(i),
            ),
        )
        for i in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(err is None and chunks > 0 for chunks, err in results.values()), results
    after = _per_replica_stats(app)
    served = {r: after[r].requests_finished_total - before.get(r, 0) for r in after}
    assert len(served) == 2 and all(n > 0 for n in served.values()), served
    assert sum(served.values()) == 16
    assert all(
        s.num_running == 0 and s.num_free_pages == s.num_total_pages for s in after.values()
    ), after
    # /metrics adds both replicas up.
    metrics = httpx.get(url + "/metrics", timeout=30).text
    total = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("sglang:num_requests_total{")
    )
    assert total == sum(
        s.requests_finished_total + s.requests_aborted_total for s in after.values()
    )


def test_a_shared_prefix_follows_the_replica_that_cached_it(two_replicas):
    app, url = two_replicas
    prefix = [7 + (i % 50) for i in range(96)]  # six full pages of 16 tokens
    cached = []
    for i in range(8):
        r = httpx.post(
            url + "/v1/completions",
            json={"model": "tiny", "prompt": prefix + [100 + i, 101 + i], "max_tokens": 2},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    # Every request after the first finds the prefix where the first one left it.
    assert all(c >= 80 for c in cached[1:]), cached


def test_engine_replicas_scale_one_two_one_with_load(serve_http_url):
    from ray import serve

    app = "edgeacc_autoscale"
    args = {
        **ARGS,
        "max_num_seqs": 2,
        "engine_replicas": {
            "min_replicas": 1,
            "max_replicas": 2,
            "target_waiting_per_replica": 1,
            "upscale_delay_s": 0,
            "downscale_delay_s": 4,
            "look_back_period_s": 2,
        },
    }
    url = serve_app(args, app, serve_http_url, "/autoscale")
    try:
        assert _running(app, "EngineServer") == 1
        results: dict = {}
        stop = threading.Event()

        def load(i: int) -> None:
            while not stop.is_set():
                record_stream(
                    url,
                    "/v1/completions",
                    {"model": "tiny", "prompt": f"load {i}", "max_tokens": 64, "ignore_eos": True},
                    results,
                    str(i),
                )

        threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(10)]
        for t in threads:
            t.start()
        try:
            deadline = time.monotonic() + 180
            while _running(app, "EngineServer") < 2:
                assert time.monotonic() < deadline, _replica_counts(app, "EngineServer")
                time.sleep(0.5)
        finally:  # a failed wait must not leave the load running through the rest of the suite
            stop.set()
            for t in threads:
                t.join(120)
        assert all(err is None for _, err in results.values()), results
        deadline = time.monotonic() + 90
        while _replica_counts(app, "EngineServer") != {"RUNNING": 1}:
            assert time.monotonic() < deadline, _replica_counts(app, "EngineServer")
            time.sleep(0.5)
        r = httpx.post(
            url + "/v1/completions",
            json={"model": "tiny", "prompt": "after", "max_tokens": 4},
            timeout=60,
        )
        assert r.status_code == 200, r.text
    finally:
        serve.delete(app)
