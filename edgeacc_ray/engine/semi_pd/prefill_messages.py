"""What crosses between the decode process and the prefill process in Semi-PD: page ids, token ids
and sampling state, never KV bytes (the pages themselves are in the shared pool)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from edgeacc_ray.engine.kv import StorageSpec
from edgeacc_ray.engine.request import (
    EngineUnavailable,
    GrammarMask,
    SamplingParams,
    TokenLogprob,
)


@dataclass
class PrefillTask:
    """Fill the KV of token_ids[num_computed_tokens:] into the granted pages, then sample one token."""

    request_id: str
    token_ids: list[int]  # prompt, plus the output so far when a preempted sequence comes back
    num_prompt_tokens: int
    num_computed_tokens: int  # prefix already in the pages (prefix-cache hit)
    page_table: list[int]  # pages granted by the decode side, covering every token
    params: SamplingParams
    generator_state: torch.Tensor | None = None  # a seeded request's RNG state
    grammar_mask: GrammarMask | None = None  # a constrained request's rule for its first token
    eos_token_ids: frozenset[int] = frozenset()  # held back until params.min_tokens
    next_prompt_logprob: int | None = (
        None  # params.prompt_logprobs: the first prompt token to score (None: done)
    )


@dataclass
class PrefillBatch:
    storage: StorageSpec  # the pool to write into (the prefill side maps it on first sight)
    tasks: list[PrefillTask]


@dataclass
class PrefillResult:
    request_id: str
    token_id: int
    logprob: TokenLogprob | None
    generator_state: torch.Tensor | None
    prompt_logprobs: list[TokenLogprob] = field(
        default_factory=list
    )  # from task.next_prompt_logprob on


@dataclass
class PrefillBatchResult:
    results: list[PrefillResult]
    compute_seconds: float  # time the prefill process spent on the batch (for the split controller)


class PrefillFailed(EngineUnavailable):
    """The prefill side could not run a batch (its process died or refused it); the requests fail."""


class PrefillReplicaTaken(RuntimeError):
    """A prefill replica asked to pair with a decode replica already serves another live one."""


@dataclass(frozen=True)
class StorageProbe:
    """How the prefill process sees the shared storage (checks and diagnostics: the same memory as the
    decode side, no private copy): addresses, the bytes its own allocator holds, and per-page KV sums."""

    pid: int
    storage_name: str | None
    kv_cache_ptr: int
    weight_ptr: int
    device: str
    own_allocated_bytes: int  # CUDA: torch.cuda.memory_allocated() in the prefill process; CPU: 0
    page_sums: list[float]  # sum of |KV| over each page asked for, across layers
