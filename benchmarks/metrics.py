"""Serving metrics as SGLang's bench_serving defines them, and Prometheus counter parsing.

Over the successful requests of one run lasting `duration` seconds (first send to last answer):
- request throughput = completed / duration; input, output and total token throughput likewise;
- TTFT per request; TPOT = (E2E - TTFT) / (output tokens - 1), for requests with > 1 output token;
- ITL = every gap between consecutive streamed chunks, pooled over requests; E2E per request;
- each as mean, median and p99 (numpy's linear-interpolated percentile), in milliseconds;
- concurrency = sum of E2E / duration (the average number of requests in flight).
Failed requests are counted (`failed`) and their errors tallied; they add nothing else.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

from benchmarks.client import RequestResult

# (cached prompt tokens, prompt tokens) counter pairs, first match wins.
CACHE_COUNTERS: tuple[tuple[str, str], ...] = (
    ("sglang:cached_tokens_total", "sglang:prompt_tokens_total"),
    ("vllm:prompt_tokens_cached_total", "vllm:prompt_tokens_total"),
    ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"),
)
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)")


def stats_ms(values: Sequence[float], name: str) -> dict[str, float | None]:
    """mean/median/p99 of `values` (seconds) in ms, keyed `mean_<name>_ms` etc.; None when empty."""
    if not values:
        return {f"{k}_{name}_ms": None for k in ("mean", "median", "p99")}
    arr = np.asarray(values, dtype=float) * 1000.0
    return {
        f"mean_{name}_ms": float(arr.mean()),
        f"median_{name}_ms": float(np.median(arr)),
        f"p99_{name}_ms": float(np.percentile(arr, 99)),
    }


def summarize(
    results: Sequence[RequestResult], duration: float
) -> dict[str, float | int | None | dict]:
    """The run's metrics (see the module docstring) from its per-request results."""
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    e2e = [r.latency for r in ok]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [gap for r in ok for gap in r.itl]
    errors = Counter(r.error for r in results if not r.success)
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": dict(errors.most_common(5)),
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "input_throughput": total_in / duration,
        "output_throughput": total_out / duration,
        "total_throughput": (total_in + total_out) / duration,
        **stats_ms([r.ttft for r in ok], "ttft"),
        **stats_ms(tpots, "tpot"),
        **stats_ms(itls, "itl"),
        **stats_ms(e2e, "e2e"),
        "concurrency": sum(e2e) / duration,
    }


def usage_hit_rate(results: Iterable[RequestResult]) -> float | None:
    """Sum of `usage.prompt_tokens_details.cached_tokens` over sum of prompt tokens, over the
    successful responses that reported cached tokens; None when none did."""
    reported = [r for r in results if r.success and r.cached_tokens is not None]
    prompt = sum(r.prompt_tokens for r in reported)
    return sum(r.cached_tokens or 0 for r in reported) / prompt if prompt else None


def parse_prometheus(text: str) -> dict[str, float]:
    """Sample values of a Prometheus text exposition, summed over label sets, keyed by metric name."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            totals[m.group(1)] = totals.get(m.group(1), 0.0) + float(m.group(3))
    return totals


def cache_counters(samples: dict[str, float]) -> tuple[float, float] | None:
    """(cached prompt tokens, prompt tokens) from SGLang- or vLLM-named counters, if present."""
    for cached, prompt in CACHE_COUNTERS:
        if cached in samples and prompt in samples:
            return samples[cached], samples[prompt]
    return None


def counter_hit_rate(
    before: tuple[float, float] | None, after: tuple[float, float] | None
) -> float | None:
    """Cached / prompt tokens between two counter snapshots; None if either is missing or no prompts."""
    if before is None or after is None:
        return None
    prompt = after[1] - before[1]
    return (after[0] - before[0]) / prompt if prompt > 0 else None
