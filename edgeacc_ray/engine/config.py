"""Engine settings: what to load, where, and how much KV memory and batch to allow."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    """Settings of one native engine. `model` is an HF folder or a built-in name ("tiny", "small")."""

    model: str = "tiny"
    dtype: str = "auto"  # auto (bf16 on CPU/CUDA unless the checkpoint says fp16), bfloat16, float16, float32
    device: str = "cpu"
    page_size: int = 16
    kv_cache_memory_gb: float = 1.0  # budget for the KV page pool; ignored when num_pages is set
    num_pages: int | None = None
    decode_workspace_memory_gb: float = 1.0  # CPU: contiguous copy of decoding sequences' KV (0: off)
    max_num_seqs: int = 256  # upper bound on running sequences; the admission policy may allow fewer
    max_num_batched_tokens: int = 2048  # per-step token budget (chunked prefill)
    max_model_len: int | None = None  # default: the checkpoint's max_position_embeddings, capped at 32768
    num_threads: int = 1  # torch compute threads on CPU (DESIGN §5: one per process)
    enable_prefix_caching: bool = True
    stream_interval: int = 1  # async API: hand out a chunk at least every N tokens
    max_logprobs: int = 20
    seed: int = 0
    semi_pd: SemiPDConfig | None = None  # set: prefill runs in another process on the shared pool


@dataclass(frozen=True)
class SemiPDConfig:
    """Semi-PD settings of the decode side (DESIGN §4): how prompts go to the prefill process, which
    cores the pair splits, and the targets that move the split."""

    cores: tuple[int, ...] = ()  # cores the pair splits; empty: every core this process may use
    prefill_batch_tokens: int = 512  # prompt tokens per batch sent to the prefill process
    max_prefill_batches_in_flight: int = 2
    ttft_slo_ms: float = 2000.0
    tpot_slo_ms: float = 100.0
    lend_idle_cores: bool = True  # a phase with no work lends its cores to the other
