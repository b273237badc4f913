"""Prometheus text metrics of the HTTP server, under SGLang's names (`sglang:*`) so its dashboards work.

Latency histograms (TTFT, inter-token latency, TPOT, end-to-end) are observed where the request enters
(the Ingress); load gauges and token counters come from the engine's `EngineStats` at scrape time.
No dependency: the text exposition format is written by hand.
"""
from __future__ import annotations

import bisect
import math
import threading
from typing import Iterable

# Bucket bounds as SGLang's collector uses them, with finer low ends (CPU steps are milliseconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                15.0, 20.0, 25.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
               0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               90.0, 120.0, 300.0)


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _labels(labels: dict[str, str], extra: tuple[str, str] | None = None) -> str:
    items = list(labels.items())
    if extra:
        items.insert(0, extra)
    if not items:
        return ""
    def esc(v: object) -> str:
        return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    body = ",".join(f'{k}="{esc(v)}"' for k, v in items)
    return "{" + body + "}"


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: Iterable[float]):
        self.name, self.help = name, help_text
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, n: int = 1) -> None:
        if n <= 0:
            return
        self.counts[bisect.bisect_left(self.bounds, value)] += n
        self.sum += value * n
        self.count += n

    def render(self, labels: dict[str, str]) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        out.append(f"{self.name}_sum{_labels(labels)} {_fmt(self.sum)}")
        cumulative = 0
        for bound, c in zip(self.bounds + (math.inf,), self.counts):
            cumulative += c
            out.append(f"{self.name}_bucket{_labels(labels, ('le', _fmt(bound)))} {_fmt(cumulative)}")
        out.append(f"{self.name}_count{_labels(labels)} {_fmt(self.count)}")
        return out


class ServerMetrics:
    """One Ingress replica's request-level metrics plus a renderer that adds the engine's gauges."""

    def __init__(self, model_name: str):
        self.labels = {"model_name": model_name}
        self._lock = threading.Lock()
        self.ttft = Histogram("sglang:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS)
        self.itl = Histogram("sglang:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             ITL_BUCKETS)
        self.tpot = Histogram("sglang:time_per_output_token_seconds",
                              "Histogram of time per output token in seconds.", ITL_BUCKETS)
        self.e2e = Histogram("sglang:e2e_request_latency_seconds",
                             "Histogram of End-to-end request latency in seconds", E2E_BUCKETS)
        self.num_requests = 0  # finished requests seen by this replica
        self.num_aborted = 0
        self.num_errors = 0
        self.http_in_flight = 0

    # ---- observations (called by the Ingress) ----
    def first_token(self, ttft_s: float) -> None:
        with self._lock:
            self.ttft.observe(ttft_s)

    def tokens(self, gap_s: float, n: int) -> None:
        """`n` tokens arrived `gap_s` after the previous chunk: each token counts gap/n."""
        if n > 0:
            with self._lock:
                self.itl.observe(gap_s / n, n)

    def finished(self, e2e_s: float, ttft_s: float | None, num_output_tokens: int, aborted: bool = False) -> None:
        with self._lock:
            self.e2e.observe(e2e_s)
            self.num_requests += 1
            self.num_aborted += int(aborted)
            if ttft_s is not None and num_output_tokens > 1:
                self.tpot.observe((e2e_s - ttft_s) / (num_output_tokens - 1))

    def error(self) -> None:
        with self._lock:
            self.num_errors += 1

    # ---- exposition ----
    def render(self, stats=None, extra_gauges: dict[str, tuple[str, float]] | None = None) -> str:
        """Prometheus text. `stats` is the engine's EngineStats (or None when unreachable)."""
        L = self.labels
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, value: float) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{_labels(L)} {_fmt(value)}"])

        if stats is not None:
            metric("sglang:num_running_reqs", "gauge", "The number of running requests", stats.num_running)
            metric("sglang:num_queue_reqs", "gauge", "The number of requests in the waiting queue", stats.num_waiting)
            usage = min(max(stats.kv_usage, 0.0), 1.0)
            used_pages = round(usage * stats.num_total_pages)
            metric("sglang:num_used_tokens", "gauge", "The number of used tokens", used_pages * stats.page_size)
            metric("sglang:max_total_num_tokens", "gauge", "Maximum total number of tokens",
                   stats.num_total_pages * stats.page_size)
            metric("sglang:token_usage", "gauge", "The token usage", usage)
            metric("sglang:cache_hit_rate", "gauge", "The cache hit rate", stats.cache_hit_rate)
            metric("sglang:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
                   stats.prompt_tokens_total)
            metric("sglang:generation_tokens_total", "counter", "Number of generation tokens processed.",
                   stats.generation_tokens_total)
            metric("sglang:cached_tokens_total", "counter", "Number of cached prompt tokens.",
                   stats.cached_prompt_tokens_total)
            metric("edgeacc:num_free_pages", "gauge", "Free KV pages (cached pages excluded)", stats.num_free_pages)
            metric("edgeacc:num_cached_pages", "gauge", "Evictable prefix-cache KV pages", stats.num_cached_pages)
            metric("edgeacc:requests_aborted_total", "counter", "Requests aborted in the engine",
                   stats.requests_aborted_total)
            if stats.split is not None:
                split = stats.split
                metric("edgeacc:semi_pd_prefill_cores", "gauge", "Cores computing prefill now (Semi-PD split)",
                       len(split.prefill_cores))
                metric("edgeacc:semi_pd_decode_cores", "gauge", "Cores computing decode now (Semi-PD split)",
                       len(split.decode_cores))
                metric("edgeacc:semi_pd_base_prefill_cores", "gauge",
                       "Prefill's share while both phases have work (moved by the TTFT/TPOT targets)",
                       split.base_prefill_cores)
                metric("edgeacc:semi_pd_split_moves_total", "counter", "Times the compute split moved",
                       split.moves_total)
                metric("edgeacc:semi_pd_prefill_batches_total", "counter", "Batches sent to the prefill server",
                       split.prefill_batches_total)
                metric("edgeacc:num_prefilling_reqs", "gauge", "Requests whose prompt is in the prefill server",
                       stats.num_prefilling)
        for name, (help_text, value) in (extra_gauges or {}).items():
            metric(name, "gauge", help_text, value)
        with self._lock:
            metric("sglang:num_requests_total", "counter", "Number of requests processed.", self.num_requests)
            metric("sglang:num_aborted_requests_total", "counter", "Number of requests aborted.", self.num_aborted)
            metric("edgeacc:http_errors_total", "counter", "Requests answered with an error status.", self.num_errors)
            metric("edgeacc:http_requests_in_flight", "gauge", "Generation requests being served.",
                   self.http_in_flight)
            for h in (self.ttft, self.itl, self.tpot, self.e2e):
                lines.extend(h.render(L))
        return "\n".join(lines) + "\n"
