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
