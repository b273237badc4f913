"""A request as the engine tracks it: tokens, pages, progress and sampling state."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from edgeacc_ray.engine.request.outputs import TokenLogprob
from edgeacc_ray.engine.request.sampling_params import SamplingParams
from edgeacc_ray.engine.request.structured_output import GrammarMask
from edgeacc_ray.prefix_keys import ROOT_KEY

if TYPE_CHECKING:
    from edgeacc_ray.engine.kv import PrefixLoad


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    LOADING = "loading"  # admitted; its prefix is coming from the KV tier (engine/kv/tier.py)
    PREFILLING = "prefilling"  # Semi-PD: its prompt is being computed in the prefill process
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    status: SequenceStatus = SequenceStatus.WAITING
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    page_table: list[int] = field(default_factory=list)
    page_keys: list[bytes] = field(default_factory=list)  # prefix keys of the full pages, in order
    num_computed_tokens: int = 0  # tokens whose KV is in the pages
    num_cached_tokens: int = (
        0  # prompt tokens that came from the prefix cache (device pool or KV tier)
    )
    num_host_cached_tokens: int = 0  # of those, the ones loaded from the KV tier
    prefix_load: PrefixLoad | None = None  # the KV tier read in flight while LOADING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # Prompt logprobs (params.prompt_logprobs): entries for prompt tokens prompt_logprobs_base, base + 1, ...
    # as they are computed; the entry of token j comes from position j - 1.
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    prompt_logprobs_base: int = 0
    generator: torch.Generator | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    detokenizer: Any = None  # IncrementalDetokenizer, set by the engine
    matcher: Any = None  # llguidance matcher of a constrained request (advanced as tokens come out)
    # The matcher's rule for the next token (set before sampling).
    grammar_mask: GrammarMask | None = None
    eos_token_ids: frozenset[int] = frozenset()  # held back until params.min_tokens are out

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)
        if (
            self.params.prompt_logprobs is not None
        ):  # the start token's entry is None (nothing before it scored)
            self.prompt_logprobs_base, self.prompt_logprobs = (
                self.params.prompt_logprobs_start,
                [None],
            )

    @property
    def last_page_key(self) -> bytes:
        """The key of the last keyed page: the parent of the next page's key."""
        return self.page_keys[-1] if self.page_keys else ROOT_KEY

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def next_prompt_logprob(self) -> int | None:
        """The prompt token whose logprob is computed next (from position one before it); None when
        none is asked for or all are done."""
        if self.params.prompt_logprobs is None:
            return None
        token = self.prompt_logprobs_base + len(self.prompt_logprobs)
        return token if token < self.num_prompt_tokens else None

    @property
    def num_cacheable_tokens(self) -> int:
        """How many leading tokens may come from a cache (device pool or KV tier): never the last one,
        and none past the first position whose prompt logprobs are still to be computed."""
        token = self.next_prompt_logprob
        return self.num_tokens - 1 if token is None else min(self.num_tokens - 1, token - 1)
