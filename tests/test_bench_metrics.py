"""Serving metrics against hand-computed values on synthetic timings; Prometheus counters."""

from __future__ import annotations

import pytest

from benchmarks.client import RequestResult
from benchmarks.metrics import (
    cache_counters,
    counter_hit_rate,
    parse_prometheus,
    summarize,
    usage_hit_rate,
)


def ok(ttft: float, latency: float, out: int, prompt: int, itl: list[float]) -> RequestResult:
    return RequestResult(
        success=True, ttft=ttft, latency=latency, output_tokens=out, prompt_tokens=prompt, itl=itl
    )


RESULTS = [
    ok(0.1, 1.1, 11, 100, [0.1] * 10),  # TPOT (1.1 - 0.1) / 10 = 0.1
    ok(0.3, 2.3, 5, 50, [0.5] * 4),  # TPOT (2.3 - 0.3) / 4 = 0.5
    ok(0.2, 0.2, 1, 20, []),  # one output token: no TPOT
    RequestResult(success=False, error="HTTP 500: boom", prompt_tokens=999, output_tokens=999),
]


def test_summary_matches_hand_computed_values() -> None:
    m = summarize(RESULTS, duration=4.0)
    assert (m["completed"], m["failed"], m["errors"]) == (3, 1, {"HTTP 500: boom": 1})
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (170, 17)
    assert m["request_throughput"] == pytest.approx(0.75)
    assert m["input_throughput"] == pytest.approx(42.5)
    assert m["output_throughput"] == pytest.approx(4.25)
    assert m["total_throughput"] == pytest.approx(46.75)
    # TTFT 100, 300, 200 ms; p99 interpolates between the 2nd and 3rd sorted value: 200 + 0.98 * 100.
    assert (m["mean_ttft_ms"], m["median_ttft_ms"], m["p99_ttft_ms"]) == pytest.approx(
        (200, 200, 298)
    )
    # TPOT 100 and 500 ms.
    assert (m["mean_tpot_ms"], m["median_tpot_ms"], m["p99_tpot_ms"]) == pytest.approx(
        (300, 300, 496)
    )
    # ITL: ten gaps of 100 ms and four of 500 ms, pooled.
    assert (m["mean_itl_ms"], m["median_itl_ms"], m["p99_itl_ms"]) == pytest.approx(
        (3000 / 14, 100, 500)
    )
    # E2E 1100, 2300, 200 ms.
    assert (m["mean_e2e_ms"], m["median_e2e_ms"], m["p99_e2e_ms"]) == pytest.approx(
        (1200, 1100, 2276)
    )
    assert m["concurrency"] == pytest.approx(3.6 / 4.0)


def test_all_failed_gives_empty_latencies_not_zeros() -> None:
    m = summarize([RequestResult(error="x"), RequestResult(error="x")], duration=1.0)
    assert (m["completed"], m["failed"], m["errors"]) == (0, 2, {"x": 2})
    assert m["mean_ttft_ms"] is None and m["p99_e2e_ms"] is None
    assert m["output_throughput"] == 0.0


def test_usage_hit_rate_sums_cached_over_prompt_tokens() -> None:
    results = [
        RequestResult(success=True, prompt_tokens=100, cached_tokens=0),
        RequestResult(success=True, prompt_tokens=300, cached_tokens=240),
        RequestResult(success=True, prompt_tokens=500),  # reported no cached tokens: left out
        RequestResult(success=False, prompt_tokens=100, cached_tokens=100),
    ]
    assert usage_hit_rate(results) == pytest.approx(240 / 400)
    assert usage_hit_rate(results[2:]) is None


PROM_SGLANG = """\
# HELP sglang:prompt_tokens_total Number of prefill tokens processed.
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{model_name="small",tp_rank="0"} 1000.0
sglang:prompt_tokens_total{model_name="small",tp_rank="1"} 200.0
sglang:cached_tokens_total{model_name="small"} 600.0
sglang:generation_tokens_total{model_name="small"} 5e2
sglang:num_running_reqs 3
"""
PROM_VLLM = """\
vllm:prefix_cache_queries_total{engine="0",model_name="dev"} 400.0
vllm:prefix_cache_queries_created{engine="0",model_name="dev"} 1.79e+09
vllm:prefix_cache_hits_total{engine="0",model_name="dev"} 100.0
"""


def test_parse_prometheus_sums_label_sets_and_skips_comments() -> None:
    samples = parse_prometheus(PROM_SGLANG)
    assert samples["sglang:prompt_tokens_total"] == 1200.0
    assert samples["sglang:generation_tokens_total"] == 500.0
    assert samples["sglang:num_running_reqs"] == 3.0
    assert not any(name.startswith("#") for name in samples)


def test_cache_counters_for_sglang_and_vllm_names() -> None:
    assert cache_counters(parse_prometheus(PROM_SGLANG)) == (600.0, 1200.0)
    assert cache_counters(parse_prometheus(PROM_VLLM)) == (100.0, 400.0)
    assert cache_counters(parse_prometheus("other_metric 1\n")) is None


def test_counter_hit_rate_uses_the_difference() -> None:
    assert counter_hit_rate((10.0, 100.0), (70.0, 200.0)) == pytest.approx(0.6)
    assert counter_hit_rate(None, (1.0, 2.0)) is None
    assert counter_hit_rate((1.0, 2.0), (1.0, 2.0)) is None
