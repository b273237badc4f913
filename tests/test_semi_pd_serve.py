"""Semi-PD on a real Ray cluster over real HTTP: separate PrefillServer and DecodeServer deployments
sharing one segment; greedy output equals the offline colocated engine in fp32; the split is visible
in /metrics and /get_server_info; killing either process gives clean errors, the service recovers by
itself and no shared segment is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import httpx
import openai
import pytest
from serve_helpers import record_stream, replica_pid, replica_pids, serve_app, wait_serving

from edgeacc_ray.engine.kv.shared_arena import PREFIX, SHM_DIR
from edgeacc_ray.engine.request import SamplingParams
from edgeacc_ray.engine.semi_pd import PrefillReplicaTaken
from edgeacc_ray.llm import LLM

APP = "edgeacc_spd"
ARGS = {
    "model": "tiny",
    "served_model_name": "tiny",
    "dtype": "float32",
    "kv_cache_memory_gb": 0.25,
    "pd_mode": "semi_pd",
    "stream_interval": 4,
    "prefill_batch_tokens": 128,
}
IDS = [[(17 * i + 3 * k) % 7000 + 100 for k in range(n)] for i, n in enumerate((5, 37, 180, 64, 9))]


@pytest.fixture(scope="module")
def url(serve_http_url) -> str:
    from ray import serve

    yield serve_app(ARGS, APP, serve_http_url, "/spd")
    serve.delete(APP)


def segments() -> set[str]:
    return {p.name for p in SHM_DIR.glob(f"{PREFIX}-*")}


def internal(base: str) -> dict:
    return httpx.get(base + "/get_server_info", timeout=10).json()["internal_states"][0]


def test_separate_deployments_share_one_segment(url):
    from ray import serve

    status = serve.status().applications[APP]
    assert {"Ingress", "DecodeServer", "PrefillServer"} <= set(status.deployments)
    decode, prefill = replica_pid(APP, "DecodeServer"), replica_pid(APP, "PrefillServer")
    assert decode != prefill
    httpx.post(
        url + "/generate",
        json={"input_ids": IDS[2], "sampling_params": {"max_new_tokens": 2}},
        timeout=30,
    )
    name = internal(url)["semi_pd_split"]["storage"]
    for pid in (decode, prefill):  # both processes map the same file
        with open(f"/proc/{pid}/maps") as f:
            assert name in f.read()


def test_greedy_equals_colocated_offline_fp32(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    with LLM("tiny", dtype="float32") as llm:
        expected = llm.generate(IDS, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    got = client.completions.create(
        model="tiny", prompt=IDS, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    )
    by_index = sorted(got.choices, key=lambda c: c.index)
    assert [c.text for c in by_index] == [e.text for e in expected]
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="tiny",
            prompt=IDS[2],
            max_tokens=16,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert streamed == expected[2].text


def test_split_visible_in_metrics_and_server_info(url):
    info = httpx.get(url + "/get_server_info", timeout=10).json()
    assert info["mode"] == "semi_pd" and info["pd_mode"] == "semi_pd"
    split = info["internal_states"][0]["semi_pd_split"]
    assert split["moves_total"] >= 1 and split["prefill_batches_total"] >= 1
    metrics = httpx.get(url + "/metrics", timeout=10).text
    for name in (
        "edgeacc:semi_pd_prefill_cores",
        "edgeacc:semi_pd_decode_cores",
        "edgeacc:semi_pd_split_moves_total",
    ):
        assert name in metrics
    targets = info["internal_states"][0][
        "slo_targets"
    ]  # no SLO set: none for the bound, derived for the split
    assert (
        targets["running_bound_tpot"]["source"] == "none"
        and targets["running_bound_tpot"]["ms"] is None
    )
    for name in ("split_ttft", "split_tpot"):
        assert targets[name]["source"] in ("derived", "none")
        if targets[name]["source"] == "derived":
            assert targets[name]["ms"] > targets[name]["floor_ms"] > 0
            assert (
                f'edgeacc:slo_target_ms{{model_name="tiny",source="derived",target="{name}"}}'
                in metrics
            )


def _stream(url: str, ids: list[int], max_tokens: int, results: dict, key: str) -> None:
    """One streaming /generate; records the tokens and whether it ended cleanly or with an error event."""
    record_stream(
        url,
        "/generate",
        {"input_ids": ids, "sampling_params": {"max_new_tokens": max_tokens, "ignore_eos": True}},
        results,
        key,
    )


def test_killed_prefill_server_fails_only_its_batch_and_recovers(url):
    running = {}
    decoding = threading.Thread(target=_stream, args=(url, IDS[0], 300, running, "decoding"))
    decoding.start()
    time.sleep(1.0)  # its prompt is done: it decodes in the decode process only
    os.kill(replica_pid(APP, "PrefillServer"), signal.SIGKILL)
    decoding.join(120)
    tokens, error = running["decoding"]
    assert error is None and tokens > 0  # decode never needed the dead process
    wait_serving(
        url, 120
    )  # Serve restarts the prefill replica; it maps the decode side's segment again
    state = internal(url)
    assert state["num_prefilling_reqs"] == 0


def test_killed_decode_server_gives_clean_errors_and_leaves_no_segment(url):
    old = internal(url)["semi_pd_split"]["storage"]
    results: dict = {}
    threads = [
        threading.Thread(target=_stream, args=(url, IDS[i % 5], 2000, results, str(i)))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    time.sleep(1.5)
    os.kill(replica_pid(APP, "DecodeServer"), signal.SIGKILL)
    for t in threads:
        t.join(120)
    for _tokens, error in results.values():
        assert error is not None  # every stream ended with an error, none hung
        assert "Actor" not in error and "pid" not in error.lower()
    wait_serving(url, 180)
    new = internal(url)["semi_pd_split"]["storage"]
    assert new != old and old not in segments() and new in segments()


def test_a_prefill_replica_serves_one_live_decode_process():
    from deployments.prefill_server import PairClaim

    pair = PairClaim()
    gone = subprocess.Popen(["true"])
    gone.wait()
    pair.take(gone.pid)
    pair.take(os.getpid())  # its decode process is dead: taken over
    pair.take(os.getpid())  # the same decode process again
    with pytest.raises(PrefillReplicaTaken):
        pair.take(os.getppid())  # another live process
    assert pair.decode_pid == os.getpid()


def test_two_pairs_each_prefill_replica_maps_its_own_decode_segment(serve_http_url):
    """engine_replicas: 2 -> two DecodeServers, two PrefillServers; each decode replica claims one prefill
    replica and pins its batches there, so each prefill process maps exactly one segment, its own pair's."""
    from ray import serve

    app = "edgeacc_spd_pairs"
    url = serve_app({**ARGS, "engine_replicas": 2}, app, serve_http_url, "/spd_pairs")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        with LLM("tiny", dtype="float32") as llm:
            expected = llm.generate(
                IDS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
            )
        results: list = [None] * 8
        threads = [
            threading.Thread(
                target=lambda i=i: results.__setitem__(
                    i,
                    client.completions.create(
                        model="tiny",
                        prompt=IDS,
                        max_tokens=8,
                        temperature=0,
                        extra_body={"ignore_eos": True},
                    ),
                )
            )
            for i in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        for got in results:  # both pairs serve, and every answer is the colocated engine's
            assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == [
                e.text for e in expected
            ]
        decode_segments = {pid: _mapped_segments(pid) for pid in replica_pids(app, "DecodeServer")}
        prefill_segments = [_mapped_segments(pid) for pid in replica_pids(app, "PrefillServer")]
        assert len(decode_segments) == len(prefill_segments) == 2
        assert all(len(names) == 1 for names in [*decode_segments.values(), *prefill_segments])
        assert set().union(*prefill_segments) == set().union(
            *decode_segments.values()
        )  # one prefill per pair
    finally:
        serve.delete(app)


def _mapped_segments(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as f:
        return {line.rsplit("/", 1)[-1].strip() for line in f if f"{PREFIX}-" in line}
