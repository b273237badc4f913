"""Tensor parallelism of the native engine on the CPU (gloo): TP=2 greedy output equals TP=1 token for
token (fp32, tiny model), settings that cannot shard are refused naming tensor_parallel_size, a lost
rank ends requests with a typed error in bounded time (never a hang) and fails the health check,
and the ranks' actors and placement group are gone after close."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest

from edgeacc_ray.config import ConfigError, EngineConfig, SemiPDConfig, ServeConfig
from edgeacc_ray.engine import AsyncLLMEngine
from edgeacc_ray.engine.request import EngineUnavailable, SamplingParams, TensorParallelFailure
from edgeacc_ray.llm import LLM
from edgeacc_ray.models.tp_shard import ShardingError

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
ENGINE_ARGS = dict(dtype="float32", num_pages=256, page_size=16)
FAILURE_BOUND_S = (
    15.0  # a lost rank is reported within this (it is seconds under the collective timeout)
)


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, 8000 - 16) for _ in range(n)]


PROMPTS = [ids(1, 1), ids(2, 7), ids(3, 40), ids(4, 17)]


def removed(ray, placement) -> bool:
    return ray.util.placement_group_table(placement)["state"] == "REMOVED"


def dead(ray, actor) -> bool:
    try:
        ray.get(actor.ready.remote(), timeout=10)
    except ray.exceptions.RayActorError:
        return True
    return False


def wait_for(predicate, timeout: float) -> float:
    """Seconds until predicate() held; fails after `timeout`."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "condition not reached in time"
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def tp1_tokens() -> list[list[int]]:
    with LLM("tiny", **ENGINE_ARGS) as llm:
        return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


def test_tp2_greedy_equals_tp1(ray_cluster, tp1_tokens):
    """Chunked prefill (budget 24 < the 40-token prompt) and a second pass that reads cached prefix
    pages exercise every attention path the ranks replay; each rank's pool holds its own KV head."""
    llm = LLM("tiny", tensor_parallel_size=2, max_num_batched_tokens=24, **ENGINE_ARGS)
    ranks = llm.engine.tp
    try:
        assert llm.engine.runner.kv_cache.shape[2] == 1  # tiny: 2 KV heads over 2 ranks
        first = llm.generate(PROMPTS, GREEDY)
        second = llm.generate(PROMPTS, GREEDY)
        assert [o.token_ids for o in first] == tp1_tokens
        assert [o.token_ids for o in second] == tp1_tokens
        assert second[2].num_cached_tokens == 32
        # The rank computes at the engine's priority, not Ray's worker niceness (15 without restore_priority).
        assert [busiest_thread_nice(pid) for pid in tp_worker_pids()] == [0]
    finally:
        llm.close()
    assert removed(ray_cluster, ranks.placement)
    assert all(dead(ray_cluster, w) for w in ranks.workers)


@pytest.mark.parametrize("tp", [3, 4])
def test_tp_must_divide_kv_heads(tp):
    """tiny has 4 heads, 2 KV heads: 3 and 4 ranks are refused before any rank starts."""
    with pytest.raises(ShardingError, match=f"tensor_parallel_size={tp}.*num_key_value_heads=2"):
        LLM("tiny", tensor_parallel_size=tp, **ENGINE_ARGS)


def test_build_app_refuses_tp_that_does_not_divide_kv_heads():
    from deployments.app import build_app

    with pytest.raises(
        ConfigError, match=r"tensor_parallel_size: tensor_parallel_size=4 .*num_key_value_heads=2"
    ):
        build_app({"model": "tiny", "tensor_parallel_size": 4})


def test_build_app_places_one_bundle_per_rank():
    from deployments.app import build_app

    app = build_app({"model": "tiny", "tensor_parallel_size": 2, "engine_num_gpus": 0})
    engine = app._bound_deployment.init_args[1]._bound_deployment
    assert engine._replica_config.placement_group_strategy == "STRICT_PACK"
    assert engine._replica_config.placement_group_bundles == [{"CPU": 0.01}] * 2


@pytest.mark.parametrize(
    "args, env",
    [
        ({"tensor_parallel_size": 2, "pd_mode": "semi_pd"}, {}),
        (
            {"pd_mode": "colocated"},
            {"TENSOR_PARALLEL_SIZE": "2", "ENABLE_EDGE_ACC": "true"},
        ),  # the tier is turned on
        ({"tensor_parallel_size": 0}, {}),
    ],
)
def test_serve_config_refuses_tp_with_what_it_does_not_cover(args, env):
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        ServeConfig.from_sources(args, env=env)


def test_engine_config_refuses_tp_with_semi_pd_or_the_tier():
    with pytest.raises(ValueError, match="tensor_parallel_size=2: semi_pd"):
        EngineConfig(tensor_parallel_size=2, semi_pd=SemiPDConfig())
    with pytest.raises(ValueError, match="tensor_parallel_size=2: the KV offload tier"):
        EngineConfig(tensor_parallel_size=2, enable_hierarchical_cache=True)


async def test_rank_killed_mid_generation_fails_streams_cleanly(ray_cluster):
    engine = AsyncLLMEngine(EngineConfig(model="tiny", tensor_parallel_size=2, **ENGINE_ARGS))
    ranks = engine.engine.tp
    try:
        stream = engine.generate(
            "r1", PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=1500, ignore_eos=True)
        )
        first = await stream.__anext__()
        assert first.token_ids and not first.finished
        ray_cluster.kill(ranks.workers[0], no_restart=True)
        started = time.monotonic()

        async def drain() -> None:
            async for chunk in stream:
                assert not chunk.finished, "generation finished before the rank was lost"

        with pytest.raises(EngineUnavailable) as info:
            await asyncio.wait_for(drain(), FAILURE_BOUND_S)
        assert isinstance(info.value, TensorParallelFailure), info.value
        assert time.monotonic() - started < FAILURE_BOUND_S
        assert not engine.is_alive()
    finally:
        engine.shutdown()
    assert removed(ray_cluster, ranks.placement)


def test_rank_lost_while_idle_fails_health_and_next_request(ray_cluster, tp1_tokens):
    llm = LLM("tiny", tensor_parallel_size=2, **ENGINE_ARGS)
    ranks = llm.engine.tp
    try:
        assert [o.token_ids for o in llm.generate(PROMPTS[:1], GREEDY)] == tp1_tokens[:1]
        ray_cluster.kill(ranks.workers[0], no_restart=True)
        wait_for(lambda: not llm.engine.healthy(), FAILURE_BOUND_S)  # the heartbeat finds it
        started = time.monotonic()
        with pytest.raises(TensorParallelFailure):
            llm.generate(PROMPTS[:1], GREEDY)
        assert time.monotonic() - started < 5
    finally:
        llm.close()
    assert removed(ray_cluster, ranks.placement)


def test_stuck_rank_times_out_instead_of_hanging(ray_cluster):
    """A rank that stops answering but keeps its connections open (SIGSTOP) fails the step after the
    collective timeout."""
    llm = LLM("tiny", tensor_parallel_size=2, tensor_parallel_timeout_s=3, **ENGINE_ARGS)
    ranks = llm.engine.tp
    pid = ranks.infos[0].pid
    try:
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(TensorParallelFailure):
            llm.generate(PROMPTS[:1], GREEDY)
        assert time.monotonic() - started < 3 + 5
    finally:
        os.kill(pid, signal.SIGCONT)
        llm.close()
    assert removed(ray_cluster, ranks.placement)


def tp_worker_pids() -> list[int]:
    """Processes of tensor-parallel ranks > 0 (Ray titles them `ray::TPWorker...`)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::TPWorker"):
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return pids


def busiest_thread_nice(pid: int) -> int:
    """The niceness of the process's thread that has used the most CPU (/proc/<pid>/task/*/stat)."""
    threads = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the name, which may hold spaces
        threads.append((int(fields[11]) + int(fields[12]), int(fields[16])))  # utime + stime, nice
    return max(threads)[1]


def tp_placements(ray) -> list[str]:
    """The placement groups in use with one bundle per rank of a TP=2 engine."""
    return [
        pg_id
        for pg_id, pg in ray.util.placement_group_table().items()
        if pg["state"] == "CREATED" and pg["strategy"] == "STRICT_PACK" and len(pg["bundles"]) == 2
    ]


def test_served_tp2_equals_tp1_and_is_restarted_after_a_rank_is_killed(
    ray_cluster, serve_http_url, tp1_tokens, monkeypatch
):
    """`serve run` with TENSOR_PARALLEL_SIZE=2 (colocated): the replica holds rank 0 in its placement
    group; killing rank 1 fails the replica's health check, Serve replaces it with a new group and the
    old group's placement and actors are gone."""
    import httpx
    from ray import serve
    from serve_helpers import serve_app, wait_serving

    monkeypatch.setenv("TENSOR_PARALLEL_SIZE", "2")  # as the EdgeAcc-SGLang image sets it
    args = {"model": "tiny", "served_model_name": "tiny", "num_threads": 1, **ENGINE_ARGS}
    url = serve_app(args, "edgeacc_tp", serve_http_url, "/tp")
    body = {
        "input_ids": PROMPTS[2],
        "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True},
    }
    try:
        assert (
            httpx.post(url + "/generate", json=body, timeout=60).json()["output_ids"]
            == tp1_tokens[2]
        )
        [placement] = tp_placements(ray_cluster)
        [pid] = tp_worker_pids()
        os.kill(pid, signal.SIGKILL)
        # a new replica with a new group; the old group's placement removed
        wait_for(
            lambda: (
                len(tp_placements(ray_cluster)) == 1 and placement not in tp_placements(ray_cluster)
            ),
            90,
        )
        wait_serving(url, 120)
        assert (
            httpx.post(url + "/generate", json=body, timeout=60).json()["output_ids"]
            == tp1_tokens[2]
        )
        assert ray_cluster.util.placement_group_table()[placement]["state"] == "REMOVED"
        assert len(tp_worker_pids()) == 1
    finally:
        serve.delete("edgeacc_tp")
    wait_for(lambda: tp_placements(ray_cluster) == [] and tp_worker_pids() == [], 30)
