"""Engine settings: what to load, where, and how much KV memory and batch to allow.

`EngineSettings` holds the tunables with their one default and range; `EngineConfig` (one engine)
and the serving config (`edgeacc_ray.config.ServeConfig`) both extend it, so no setting is copied.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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


class EngineSettings(BaseModel):
    """The native engine's tunables."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bfloat16 unless the checkpoint is float16")
    page_size: int = Field(16, ge=1)
    kv_cache_memory_gb: float = Field(1.0, gt=0, description="budget of the KV page pool; num_pages overrides it")
    num_pages: int | None = Field(None, ge=2)
    decode_workspace_memory_gb: float = Field(
        1.0, ge=0, description="CPU: contiguous copy of the decoding sequences' KV (0: off)")
    max_num_seqs: int = Field(256, ge=1, description="upper bound on running sequences")
    max_num_batched_tokens: int = Field(2048, ge=1, description="tokens per step (chunked prefill)")
    max_model_len: int | None = Field(
        None, ge=2, description="default: the checkpoint's max_position_embeddings, capped at 32768")
    num_threads: int = Field(1, ge=1, description="torch compute threads of the engine process (DESIGN §5)")
    enable_prefix_caching: bool = True
    stream_interval: int = Field(4, ge=1, description="tokens per streamed chunk after the first, at least "
                                 "(SGLang --stream-interval; 4 keeps the per-item Ray cost off the engine core)")
    max_logprobs: int = Field(20, ge=0)
    seed: int = 0


class EngineConfig(EngineSettings):
    """Settings of one native engine. `model` is an HF folder or a built-in name ("tiny", "small")."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), frozen=True)

    model: str = Field("tiny", min_length=1)
    device: Literal["cpu", "cuda"] = "cpu"
    semi_pd: SemiPDConfig | None = None  # set: prefill runs in another process on the shared pool
