"""Autoscaling of the engine replicas (colocated `EngineServer`s or Semi-PD `DecodeServer` pairs) on
what limits an LLM engine: requests waiting for admission, KV reserved by admitted ones, and TTFT.

Serve's default policy scales on ongoing handle calls, which for our engines counts an Ingress's
output stream and its lease renewals, not requests. Here each replica reports `autoscaling_signals`
(`record_autoscaling_stats`), Serve averages them over `look_back_period_s`, and `EngineScalingPolicy`
asks for one replica more while any signal is over its bound, one fewer when the load would fit the
remaining replicas with room to spare. Serve applies `min_replicas` / `max_replicas` and the delays
(`upscale_delay_s`, and `downscale_delay_s`: the quiet period before scaling down).
"""

from __future__ import annotations

import math
import threading
from typing import Any

from edgeacc_ray.engine.request import EngineStats

SIGNALS = ("waiting", "running", "kv_reserved", "ttft_s")


class _TTFTWindow:
    """Mean TTFT of the requests whose first token came since the previous report (0 if none)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count, self._sum = 0, 0.0

    def update(self, stats: EngineStats) -> float:
        if stats.latency is None:
            return 0.0
        count, total = sum(stats.latency.ttft.counts), stats.latency.ttft.sum
        with self._lock:
            new, spent = count - self._count, total - self._sum
            self._count, self._sum = count, total
        return spent / new if new > 0 else 0.0


_ttft_window = _TTFTWindow()  # one engine per replica process


def autoscaling_signals(stats: EngineStats) -> dict[str, float]:
    """One replica's report: requests not yet running, running, share of KV pages reserved, recent TTFT."""
    return {
        "waiting": float(stats.num_waiting + stats.num_loading),
        "running": float(stats.num_running + stats.num_prefilling),
        "kv_reserved": stats.reserved_pages / max(stats.num_total_pages, 1),
        "ttft_s": _ttft_window.update(stats),
    }


class EngineScalingPolicy:
    """A Serve autoscaling policy (`autoscaling_config.policy.policy_function`); its constructor takes
    `policy_kwargs`. Returns the wanted replica count; Serve bounds and delays it."""

    def __init__(
        self,
        target_waiting_per_replica: float = 4.0,
        kv_high: float = 0.85,
        kv_low: float = 0.5,
        ttft_slo_s: float | None = None,
    ) -> None:
        if not 0 < kv_low < kv_high <= 1:
            raise ValueError(
                f"need 0 < kv_low < kv_high <= 1, got kv_low={kv_low}, kv_high={kv_high}"
            )
        self.target_waiting, self.kv_high, self.kv_low = target_waiting_per_replica, kv_high, kv_low
        self.ttft_slo_s = ttft_slo_s

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        n = ctx.current_num_replicas
        metrics = ctx.aggregated_metrics or {}
        per_replica = {name: list((metrics.get(name) or {}).values()) for name in SIGNALS}
        if n == 0 or not per_replica["waiting"]:  # no reports yet: keep what we have
            return max(n, ctx.target_num_replicas), ctx.policy_state
        return self.desired(n, per_replica), ctx.policy_state

    def desired(self, n: int, per_replica: dict[str, list[float]]) -> int:
        """One more replica under pressure, one fewer when the rest would carry the load comfortably."""
        waiting = sum(per_replica["waiting"])
        kv = per_replica["kv_reserved"]
        kv_mean = sum(kv) / len(kv) if kv else 0.0
        ttft = max(per_replica["ttft_s"], default=0.0)
        slow = self.ttft_slo_s is not None and ttft > self.ttft_slo_s
        if waiting > self.target_waiting * n or kv_mean > self.kv_high or slow:
            return n + 1
        calm = self.ttft_slo_s is None or ttft < 0.5 * self.ttft_slo_s
        if n > 1 and waiting == 0 and calm and kv_mean * n < self.kv_low * (n - 1):
            return n - 1
        return n


class IngressScalingPolicy:
    """Ingress replicas: as many as the HTTP requests in flight need at `target_per_replica` each
    (`Ingress.record_autoscaling_stats`, counted in the app, behind Serve's proxy or not)."""

    def __init__(self, target_per_replica: float = 256.0) -> None:
        self.target = target_per_replica

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        n = ctx.current_num_replicas
        counts = list(((ctx.aggregated_metrics or {}).get("http_requests") or {}).values())
        if n == 0 or not counts:  # no reports yet: keep what we have
            return max(n, ctx.target_num_replicas), ctx.policy_state
        return max(1, math.ceil(sum(counts) / self.target)), ctx.policy_state
