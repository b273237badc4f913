"""/metrics in Prometheus text, under SGLang's names (`sglang:*`) so its dashboards work.

Every counter and histogram comes from the engine's `EngineStats` (the engine counts each request
once, so the series neither go backwards when an HTTP replica restarts nor differ with the replica
that answers the scrape); only `edgeacc:http_requests_in_flight` is this replica's own.
"""

from __future__ import annotations

import math
from typing import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from edgeacc_ray.engine.request import (
    EngineStats,
    HiCacheStats,
    HistogramSnapshot,
    LatencySnapshot,
    TargetStats,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_HISTOGRAMS = (  # (name, help, LatencySnapshot field); bounds come with the engine's snapshot
    ("sglang:time_to_first_token_seconds", "Histogram of time to first token in seconds.", "ttft"),
    ("sglang:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", "itl"),
    (
        "sglang:time_per_output_token_seconds",
        "Histogram of time per output token in seconds.",
        "tpot",
    ),
    (
        "sglang:e2e_request_latency_seconds",
        "Histogram of End-to-end request latency in seconds",
        "e2e",
    ),
)


class _Snapshot:
    """A prometheus_client collector over one scrape's engine stats."""

    def __init__(self, model_name: str, stats: EngineStats | None, http_in_flight: int) -> None:
        self.labels = {"model_name": model_name}
        self.stats, self.http_in_flight = stats, http_in_flight

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=list(self.labels))
        family.add_metric(list(self.labels.values()), value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name.removesuffix("_total"), doc, labels=list(self.labels))
        family.add_metric(list(self.labels.values()), value)
        return family

    def _histogram(
        self, name: str, doc: str, snap: HistogramSnapshot | None
    ) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=list(self.labels))
        if snap is not None:
            cumulative, buckets = 0, []
            for bound, count in zip(snap.bounds + (math.inf,), snap.counts):
                cumulative += count
                buckets.append(("+Inf" if math.isinf(bound) else repr(float(bound)), cumulative))
            family.add_metric(list(self.labels.values()), buckets, snap.sum)
        return family

    def collect(self) -> Iterable[Metric]:
        s = self.stats
        yield self._gauge(
            "edgeacc:http_requests_in_flight",
            "Generation requests this HTTP replica is serving.",
            self.http_in_flight,
        )
        latency: LatencySnapshot | None = s.latency if s is not None else None
        for name, doc, field in _HISTOGRAMS:  # without stats: declared, no samples
            yield self._histogram(
                name, doc, getattr(latency, field) if latency is not None else None
            )
        if s is None:
            return
        usage = min(max(s.kv_usage, 0.0), 1.0)
        yield self._gauge(
            "sglang:num_running_reqs", "The number of running requests", s.num_running
        )
        yield self._gauge(
            "sglang:num_queue_reqs", "The number of requests in the waiting queue", s.num_waiting
        )
        yield self._gauge(
            "sglang:num_used_tokens",
            "The number of used tokens",
            round(usage * s.num_total_pages) * s.page_size,
        )
        yield self._gauge(
            "sglang:max_total_num_tokens",
            "Maximum total number of tokens",
            s.num_total_pages * s.page_size,
        )
        yield self._gauge("sglang:token_usage", "The token usage", usage)
        yield self._gauge("sglang:cache_hit_rate", "The cache hit rate", s.cache_hit_rate)
        yield self._gauge(
            "edgeacc:device_cache_hit_rate",
            "Share of prompt tokens found in the device KV pool",
            s.device_cache_hit_rate,
        )
        yield self._gauge(
            "edgeacc:host_cache_hit_rate",
            "Share of prompt tokens loaded from the KV offload tier",
            s.host_cache_hit_rate,
        )
        yield self._counter(
            "sglang:prompt_tokens_total",
            "Number of prefill tokens processed.",
            s.prompt_tokens_total,
        )
        yield self._counter(
            "sglang:generation_tokens_total",
            "Number of generation tokens processed.",
            s.generation_tokens_total,
        )
        yield self._counter(
            "sglang:cached_tokens_total",
            "Number of cached prompt tokens.",
            s.cached_prompt_tokens_total,
        )
        yield self._counter(
            "edgeacc:device_cached_tokens_total",
            "Cached prompt tokens found in the device KV pool.",
            s.device_cached_prompt_tokens_total,
        )
        yield self._counter(
            "edgeacc:host_cached_tokens_total",
            "Cached prompt tokens loaded from the KV offload tier.",
            s.host_cached_prompt_tokens_total,
        )
        yield self._counter(
            "sglang:num_requests_total",
            "Number of requests processed.",
            s.requests_finished_total + s.requests_aborted_total,
        )
        yield self._counter(
            "sglang:num_aborted_requests_total",
            "Number of requests aborted.",
            s.requests_aborted_total,
        )
        yield self._gauge(
            "edgeacc:running_bound",
            "Requests that may run at once now (holds tpot_slo_ms if set)",
            s.running_bound,
        )
        if s.targets:
            yield self._targets(s.targets)
        yield self._gauge(
            "edgeacc:reserved_pages",
            "KV pages held or reserved by admitted requests",
            s.reserved_pages,
        )
        yield self._gauge(
            "edgeacc:new_token_ratio",
            "Share of remaining max_tokens a KV reservation counts",
            s.new_token_ratio,
        )
        yield self._gauge(
            "edgeacc:queue_drain_rate",
            "Requests started per second while some waited",
            s.drain_rate,
        )
        yield self._counter(
            "edgeacc:retractions_total",
            "Running requests sent back to wait (pool short)",
            s.retractions_total,
        )
        yield self._counter(
            "edgeacc:rejected_requests_total",
            "Requests refused on arrival (HTTP 429)",
            s.rejected_total,
        )
        yield self._counter(
            "edgeacc:queue_timeouts_total",
            "Requests dropped after queue_timeout_s (HTTP 503)",
            s.queue_timeouts_total,
        )
        yield self._counter(
            "edgeacc:engine_compute_seconds_total",
            "Seconds the engine's step loop spent in "
            "forwards and sampling (Semi-PD: the decode side); the rest of the time it idled",
            s.compute_seconds_total,
        )
        yield self._gauge(
            "edgeacc:num_free_pages", "Free KV pages (cached pages excluded)", s.num_free_pages
        )
        yield self._gauge(
            "edgeacc:num_cached_pages", "Evictable prefix-cache KV pages", s.num_cached_pages
        )
        if s.hicache is not None:
            yield from self._hicache(s.hicache, s.num_loading)
        if s.split is not None:
            split = s.split
            yield self._gauge(
                "edgeacc:semi_pd_prefill_cores",
                "Cores computing prefill now (Semi-PD split)",
                len(split.prefill_cores),
            )
            yield self._gauge(
                "edgeacc:semi_pd_decode_cores",
                "Cores computing decode now (Semi-PD split)",
                len(split.decode_cores),
            )
            yield self._gauge(
                "edgeacc:semi_pd_base_prefill_cores",
                "Prefill's share while both phases have work (moved by the TTFT/TPOT targets)",
                split.base_prefill_cores,
            )
            yield self._counter(
                "edgeacc:semi_pd_split_moves_total",
                "Times the compute split moved",
                split.moves_total,
            )
            yield self._counter(
                "edgeacc:semi_pd_prefill_batches_total",
                "Batches sent to the prefill server",
                split.prefill_batches_total,
            )
            yield self._counter(
                "edgeacc:semi_pd_prefill_compute_seconds_total",
                "Seconds the prefill server computed batches",
                split.prefill_compute_seconds_total,
            )
            yield self._gauge(
                "edgeacc:num_prefilling_reqs",
                "Requests whose prompt is in the prefill server",
                s.num_prefilling,
            )

    def _targets(self, targets: list[TargetStats]) -> GaugeMetricFamily:
        """Latency targets in force: the user's SLOs or derived ones (absent while there is none)."""
        family = GaugeMetricFamily(
            "edgeacc:slo_target_ms",
            "Latency target in force, by what it bounds and "
            "where it comes from (user SLO or derived from measurement)",
            labels=[*self.labels, "target", "source"],
        )
        for t in targets:
            if t.ms is not None:
                family.add_metric([*self.labels.values(), t.name, t.source], t.ms)
        return family

    def _hicache(self, h: HiCacheStats, num_loading: int) -> Iterable[Metric]:
        """The KV offload tier, under SGLang's HiCache names where it has them."""
        yield self._counter(
            "sglang:backuped_tokens_total",
            "Number of tokens written to the KV offload tier.",
            h.pages_written_total * h.page_size,
        )
        yield self._counter(
            "sglang:load_back_tokens_total",
            "Number of tokens loaded from the KV offload tier.",
            h.pages_loaded_total * h.page_size,
        )
        yield self._gauge(
            "sglang:hicache_host_used_tokens",
            "Tokens the node's KV tier store holds (in this "
            "engine's pages; every engine and model on the node)",
            h.store_tokens,
        )
        yield self._gauge(
            "sglang:hicache_host_total_tokens",
            "Capacity of the node's KV tier store, in tokens",
            h.store_capacity_tokens,
        )
        yield self._gauge(
            "edgeacc:num_loading_reqs",
            "Admitted requests whose prefix is being read from the tier",
            num_loading,
        )
        yield self._counter(
            "edgeacc:hicache_loads_total",
            "Reads of a prompt's prefix from the KV tier",
            h.loads_total,
        )
        yield self._counter(
            "edgeacc:hicache_load_misses_total",
            "Tier reads that brought no page (miss, failure, timeout)",
            h.load_misses_total,
        )
        yield self._counter(
            "edgeacc:hicache_dropped_pages_total",
            "Pages not written to the tier (write queue full)",
            h.pages_dropped_total,
        )
        yield self._counter(
            "edgeacc:hicache_failed_calls_total",
            "Tier store calls that failed or timed out",
            h.failed_calls_total,
        )


def render(model_name: str, stats: EngineStats | None, http_in_flight: int) -> bytes:
    """The exposition text for one scrape; `stats` None when the engine is unreachable."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(model_name, stats, http_in_flight))
    return generate_latest(registry)
