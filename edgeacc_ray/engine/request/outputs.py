"""What the engine hands back to callers: per-request output chunks and final results."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgeacc_ray.engine.request.latency_metrics import LatencySnapshot
from edgeacc_ray.engine.request.slo_targets import TargetStats


@dataclass
class TokenLogprob:
    """Log-probability of the chosen token and, when asked for, the top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first
    rank: int | None = (
        None  # 1 + how many tokens are likelier (prompt tokens: vLLM's prompt_logprobs show it)
    )


@dataclass
class RequestOutput:
    """A chunk of one request's output: the tokens and text produced since the previous chunk.

    `finished` is True on the last chunk, which carries `finish_reason` ("stop", "length" or "abort")
    and, when a stop string or stop token ended it, `stop_reason`.
    """

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    # params.prompt_logprobs: on the chunk with the first token, one entry per prompt token from
    # params.prompt_logprobs_start on (the first None); None on the other chunks
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0  # total so far, including this chunk


def merge_outputs(a: RequestOutput | None, b: RequestOutput) -> RequestOutput:
    """b follows a (None: nothing yet): concatenate the new tokens, text and logprobs; take b's
    status, and b's counts where it has them. The one way chunks are merged, by the async engine,
    the HTTP layer and the offline `LLM`."""
    if a is None:
        return b
    logprobs = (
        None
        if a.logprobs is None and b.logprobs is None
        else (a.logprobs or []) + (b.logprobs or [])
    )
    return RequestOutput(
        request_id=a.request_id,
        token_ids=a.token_ids + b.token_ids,
        text=a.text + b.text,
        finished=b.finished,
        finish_reason=b.finish_reason,
        stop_reason=b.stop_reason,
        logprobs=logprobs,
        prompt_logprobs=a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs,
        num_prompt_tokens=b.num_prompt_tokens or a.num_prompt_tokens,
        num_cached_tokens=b.num_cached_tokens or a.num_cached_tokens,
        num_output_tokens=b.num_output_tokens,
    )


@dataclass
class CompletionOutput:
    """A finished request, as the offline `LLM.generate` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class SplitStats:
    """Semi-PD's compute split as it stands: which cores each phase has and how often it moved."""

    prefill_cores: list[int]
    decode_cores: list[int]
    base_prefill_cores: int  # prefill's share while both phases have work (moved by the SLOs)
    moves_total: int
    ttft_p90_ms: float  # of the last full window
    tpot_p90_ms: float
    prefill_batches_total: int
    prefill_compute_seconds_total: float  # prefill process busy on batches
    prefill_roundtrip_seconds_total: (
        float  # batches' time from dispatch to merge (compute + transport + wait)
    )
    storage: str  # the shared segment's name


@dataclass
class HiCacheStats:
    """The KV offload tier as one engine sees it: its counters since start, and the node's store as of
    its last answer (all engines and models on the node; zero until it answered)."""

    pages_written_total: (
        int  # pages sent to the tier (at their first reuse, each once per stay in the pool)
    )
    loads_total: int  # tier reads started for admitted prompts
    pages_loaded_total: int  # pages read back into the device pool
    load_misses_total: int  # reads that brought no page (a miss, a failed or timed-out call)
    page_size: int  # tokens per page
    pages_dropped_total: int = 0  # writes dropped because the client's queue was full
    failed_calls_total: int = 0  # store calls that failed or timed out
    store_pages: int = 0
    store_bytes: int = 0
    store_budget_bytes: int = 0
    page_nbytes: int = 0  # bytes of one of this engine's pages

    @property
    def store_tokens(self) -> int:
        """What the store holds, in tokens of this engine's pages."""
        return self.store_bytes // max(self.page_nbytes, 1) * self.page_size

    @property
    def store_capacity_tokens(self) -> int:
        return self.store_budget_bytes // max(self.page_nbytes, 1) * self.page_size


@dataclass
class EngineStats:
    """A snapshot of the engine's load and counters, for admission, metrics and autoscaling."""

    num_running: int
    num_waiting: int
    num_free_pages: int
    num_total_pages: int
    page_size: int
    num_cached_pages: int  # unreferenced pages kept for the prefix cache (evictable)
    prompt_tokens_total: int  # counters since start
    generation_tokens_total: int
    cached_prompt_tokens_total: (
        int  # prompt tokens served from the prefix cache: device pool or KV tier
    )
    requests_finished_total: int
    requests_aborted_total: int
    pd_mode: str = "colocated"
    num_prefilling: int = 0  # Semi-PD: requests whose prompt is in the prefill process
    split: SplitStats | None = None
    latency: LatencySnapshot | None = None
    targets: list[TargetStats] = field(
        default_factory=list
    )  # latency targets in force (slo_targets.py)
    # Admission (engine/scheduling/admission.py, running_bound.py, queue_bounds.py).
    running_bound: int = (
        0  # requests that may run at once now (follows tpot_slo_ms, at most max_num_seqs)
    )
    reserved_pages: int = (
        0  # pages held by admitted requests plus those their reservations still expect
    )
    new_token_ratio: float = (
        0.0  # share of its remaining max_tokens a request's reservation counts now
    )
    retractions_total: int = 0  # running requests sent back to wait because the pool ran short
    rejected_total: int = 0  # refused on arrival: queue full or predicted wait too long
    queue_timeouts_total: int = 0  # dropped after waiting longer than queue_timeout_s
    drain_rate: float = 0.0  # requests started per second while some waited (0: not measured yet)
    compute_seconds_total: float = (
        0.0  # the step loop in forwards and sampling (Semi-PD: the decode side's)
    )
    # The KV offload tier (engine/kv/tier.py); None when it is off.
    host_cached_prompt_tokens_total: int = (
        0  # of cached_prompt_tokens_total, those loaded from the tier
    )
    num_loading: int = 0  # admitted requests whose prefix is being read from the tier
    hicache: HiCacheStats | None = None

    @property
    def kv_usage(self) -> float:
        """Fraction of pages held by live sequences (cached-but-unreferenced pages count as free)."""
        used = self.num_total_pages - self.num_free_pages
        return used / max(self.num_total_pages, 1)

    @property
    def cache_hit_rate(self) -> float:
        """Share of prompt tokens not computed: served from the device pool or the tier."""
        return self.cached_prompt_tokens_total / max(self.prompt_tokens_total, 1)

    @property
    def device_cached_prompt_tokens_total(self) -> int:
        return self.cached_prompt_tokens_total - self.host_cached_prompt_tokens_total

    @property
    def device_cache_hit_rate(self) -> float:
        return self.device_cached_prompt_tokens_total / max(self.prompt_tokens_total, 1)

    @property
    def host_cache_hit_rate(self) -> float:
        return self.host_cached_prompt_tokens_total / max(self.prompt_tokens_total, 1)
