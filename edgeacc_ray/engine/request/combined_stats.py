"""Several engine replicas' `EngineStats` as one, for /metrics and /get_server_info of a deployment
with more than one engine: loads and counters add up, histograms merge bucket by bucket (they share
bounds), ratios are weighted, and what is one per node or per pair (the tier's store, the Semi-PD
split) is taken from the first replica that has it."""

from __future__ import annotations

import dataclasses

from edgeacc_ray.engine.request.latency_metrics import HistogramSnapshot, LatencySnapshot
from edgeacc_ray.engine.request.outputs import EngineStats, HiCacheStats

_FIRST = {
    "page_size",
    "pd_mode",
    "split",
    "targets",
}  # the same on every replica, or one pair's own
_HICACHE_NODE = {
    "page_size",
    "page_nbytes",
    "store_pages",
    "store_bytes",
    "store_budget_bytes",
}  # one store per node


def _histogram(parts: list[HistogramSnapshot]) -> HistogramSnapshot:
    counts = tuple(sum(c) for c in zip(*(p.counts for p in parts)))
    return HistogramSnapshot(parts[0].bounds, counts, sum(p.sum for p in parts))


def _latency(parts: list[LatencySnapshot]) -> LatencySnapshot | None:
    if not parts:
        return None
    return LatencySnapshot(
        *(
            _histogram([getattr(p, f.name) for p in parts])
            for f in dataclasses.fields(LatencySnapshot)
        )
    )


def _hicache(parts: list[HiCacheStats]) -> HiCacheStats | None:
    if not parts:
        return None
    values = {
        f.name: (
            getattr(parts[0], f.name)
            if f.name in _HICACHE_NODE
            else sum(getattr(p, f.name) for p in parts)
        )
        for f in dataclasses.fields(HiCacheStats)
    }
    return HiCacheStats(**values)


def combine_stats(parts: list[EngineStats]) -> EngineStats:
    """One `EngineStats` for all of `parts` (at least one)."""
    if len(parts) == 1:
        return parts[0]
    values = {}
    for f in dataclasses.fields(EngineStats):
        mine = [getattr(p, f.name) for p in parts]
        if f.name in _FIRST:
            values[f.name] = next((v for v in mine if v is not None), None)
        elif f.name == "latency":
            values[f.name] = _latency([v for v in mine if v is not None])
        elif f.name == "hicache":
            values[f.name] = _hicache([v for v in mine if v is not None])
        elif (
            f.name == "new_token_ratio"
        ):  # weighted by running requests: the share the batch as a whole counts
            running = sum(p.num_running for p in parts)
            values[f.name] = (
                sum(p.new_token_ratio * p.num_running for p in parts) / running
                if running
                else sum(mine) / len(mine)
            )
        else:
            values[f.name] = sum(mine)
    return EngineStats(**values)
