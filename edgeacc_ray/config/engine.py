"""Engine settings: what to load, where, and how much KV memory and batch to allow.

`EngineSettings` holds the tunables with their one default and range; `EngineConfig` (one engine)
and the serving config (`edgeacc_ray.config.ServeConfig`) both extend it, so no setting is copied.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator


class SemiPDSettings(BaseModel):
    """Semi-PD's tunables (pd_mode semi_pd), with their one default and range."""

    model_config = ConfigDict(extra="forbid")

    prefill_batch_tokens: int = Field(
        512, ge=1, description="prompt tokens per batch sent to the prefill server"
    )
    max_prefill_batches_in_flight: int = Field(2, ge=1)
    ttft_slo_ms: float | None = Field(
        None,
        gt=0,
        description="your TTFT SLO: moves the semi_pd split toward prefill when missed, and scales "
        "engine replicas up; null (the default): the split follows a target derived from measured TTFT",
    )
    lend_idle_cores: bool = Field(
        True, description="a phase with no work lends its cores to the other"
    )


class SemiPDConfig(SemiPDSettings):
    """Semi-PD settings of the decode side: how prompts go to the prefill process, which cores the
    pair splits, and the targets that move the split."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cores: tuple[int, ...] = ()  # cores the pair splits; empty: every core this process may use
    tpot_slo_ms: float | None = (
        None  # the user's TPOT SLO for the split; None: derived (slo_targets.py)
    )


def tensor_parallel_refusal(tensor_parallel_size: int, semi_pd: bool, tier: bool) -> str | None:
    """Why the native engine's tensor parallelism cannot run with these settings (it covers the
    colocated engine without the KV tier), or None. The one copy of the rule: EngineConfig and
    the serving config both ask it."""
    if tensor_parallel_size <= 1:
        return None
    if semi_pd:
        return (
            f"tensor_parallel_size={tensor_parallel_size}: semi_pd runs on one rank in this build; use "
            "tensor_parallel_size=1 or no semi_pd (pd_mode='colocated')"
        )
    if tier:
        return (
            f"tensor_parallel_size={tensor_parallel_size}: the KV offload tier "
            "(enable_hierarchical_cache) runs on one rank's pool; turn one of them off"
        )
    return None


class EngineSettings(BaseModel):
    """The native engine's tunables."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bfloat16 unless the checkpoint is float16"
    )
    page_size: int = Field(16, ge=1)
    kv_cache_memory_gb: float = Field(
        1.0, gt=0, description="budget of the KV page pool; num_pages overrides it"
    )
    num_pages: int | None = Field(None, ge=2)
    decode_workspace_memory_gb: float | None = Field(
        None,
        ge=0,
        description="CPU: contiguous copy of the decoding sequences' KV (0: off); default: twice the KV "
        "pool, room for every row padded to the longest (a fixed 1 GB held 64 SmolLM2 rows in bf16 but "
        "not in float32, and the whole batch then attended from the pages, several times slower)",
    )
    max_num_seqs: int = Field(
        256,
        ge=1,
        description="hard upper bound on running sequences (the running bound "
        "moves below it to hold tpot_slo_ms when one is set)",
    )
    max_num_batched_tokens: int = Field(2048, ge=1, description="tokens per step (chunked prefill)")
    max_model_len: int | None = Field(
        None, ge=2, description="default: the checkpoint's max_position_embeddings, capped at 32768"
    )
    num_threads: int | None = Field(
        None,
        ge=1,
        description="torch compute threads of the engine process; default: one per core the process "
        "may use (its CPU affinity, engine_cpu_cores when set), shared among its tensor-parallel ranks",
    )
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="ranks the native engine's attention heads and MLP are split over: the engine's "
        "process and tensor_parallel_size - 1 Ray actors on the same node (NCCL on CUDA, gloo on CPU); "
        "kv_cache_memory_gb is per rank, each holding its own KV heads",
    )
    tensor_parallel_timeout_s: float = Field(
        30.0,
        gt=0,
        description="a tensor-parallel collective that takes longer fails (a lost rank stops the "
        "engine with an error instead of hanging it)",
    )
    cuda_graphs: bool = Field(
        True,
        description="CUDA: replay captured decode steps (one graph per padded batch size and context "
        "bucket, captured on first use) on the torch attention path; no effect on CPU",
    )
    attention_backend: Literal["auto", "torch", "flashinfer"] = Field(
        "auto",
        description="CUDA: flashinfer's paged prefill/decode kernels when flashinfer imports (auto) or "
        "always (flashinfer); torch: the built-in path. CPU always uses torch",
    )
    enable_prefix_caching: bool = True
    enable_hierarchical_cache: bool = Field(
        False,
        description="offload tier (kv_store/, SGLang's HiCache): a full KV page is also written to the "
        "node's store in the Ray object store when it is first reused (a page used once never is), and a "
        "prompt's prefix missing from the device pool is loaded from there; needs enable_prefix_caching and a "
        "Ray cluster",
    )
    kv_cache_offload_memory_gb: float = Field(
        4.0,
        gt=0,
        description="byte budget of the node's tier store, applied by the engine that creates it "
        "(at most half of the node's object store)",
    )
    stream_interval: int = Field(
        4,
        ge=1,
        description="tokens per streamed chunk after the first, at least "
        "(SGLang --stream-interval; 4 keeps the per-item Ray cost off the engine core)",
    )
    max_logprobs: int = Field(20, ge=0)

    # Admission and overload (engine/scheduling/admission.py, running_bound.py, queue_bounds.py).
    tpot_slo_ms: float | None = Field(
        None,
        gt=0,
        description="your TPOT SLO: the running bound (between 1 and max_num_seqs) then admits a "
        "larger batch only while decode holds it; null (the default): no TPOT target, the bound stays at "
        "max_num_seqs and only KV memory limits the batch (a default target would be a constant tuned for "
        "some other box: it cut throughput to 0.58x on this one)",
    )
    new_token_ratio_init: float = Field(
        0.7,
        gt=0,
        le=1,
        description="share of a request's remaining max_tokens its KV reservation counts "
        "at first (SGLang's init_new_token_ratio); then learned from finished requests",
    )
    new_token_ratio_min: float = Field(
        0.1,
        gt=0,
        le=1,
        description="floor of the learned share; with both at 1.0 (and no clip) every output "
        "is reserved in full and nothing is ever retracted",
    )
    reservation_clip_tokens: int | None = Field(
        4096,
        ge=1,
        description="output tokens a reservation counts at most (SGLang's clip); null: all of "
        "max_tokens",
    )
    max_queued_requests: Literal[-1] | PositiveInt = Field(
        1024,
        description="requests that may wait to start; one more is refused (HTTP 429); -1: unbounded",
    )
    max_queue_wait_s: float | None = Field(
        30.0,
        gt=0,
        description="refuse a request (HTTP 429) whose predicted wait to start, at the measured "
        "drain rate, is longer; null: no bound",
    )
    queue_timeout_s: float | None = Field(
        60.0,
        gt=0,
        description="a request not started after this long is dropped (HTTP 503); null: never",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _tier_needs_prefix_keys(self) -> "EngineSettings":
        if self.enable_hierarchical_cache and not self.enable_prefix_caching:
            raise ValueError(
                "enable_hierarchical_cache needs enable_prefix_caching: the tier stores pages "
                "under the prefix cache's keys"
            )
        return self


def default_num_threads(tensor_parallel_size: int = 1) -> int:
    """One compute thread per core this process may use, split among the tensor-parallel ranks (each
    rank is a process of its own on the same node)."""
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    return max(1, cores // tensor_parallel_size)


class EngineConfig(EngineSettings):
    """Settings of one native engine. `model` is an HF folder or a built-in name ("tiny", "small")."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), frozen=True)

    model: str = Field("tiny", min_length=1)
    device: Literal["auto", "cpu", "cuda"] = Field(
        "cpu",
        description="auto: cuda when torch sees a GPU, else cpu (engine/hardware/device.py resolves it)",
    )
    semi_pd: SemiPDConfig | None = None  # set: prefill runs in another process on the shared pool
    kv_store_name: str | None = (
        None  # the tier's store; None: the node's own (another: a separate tier)
    )

    @property
    def compute_threads(self) -> int:
        """num_threads, or its default resolved in the calling process."""
        return self.num_threads or default_num_threads(self.tensor_parallel_size)

    @model_validator(mode="after")
    def _tensor_parallel_alone(self) -> "EngineConfig":
        """The native engine's tensor parallelism covers the colocated engine without the KV tier."""
        refusal = tensor_parallel_refusal(
            self.tensor_parallel_size, self.semi_pd is not None, self.enable_hierarchical_cache
        )
        if refusal is not None:
            raise ValueError(refusal)
        return self
