"""Per-request sampling settings (checked by `request_validation.validate_request` when a request enters the engine)."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgeacc_ray.engine.request.structured_output import StructuredOutput


@dataclass
class SamplingParams:
    """What to generate and how; field names follow vLLM/OpenAI."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; 0: chosen token only; k: also the top-k alternatives
    # Prompt logprobs (vLLM's prompt_logprobs, OpenAI's echo, SGLang's logprob_start_len): None: off; k as
    # `logprobs`. One entry per prompt token from prompt_logprobs_start on; the first is None (its
    # predecessor's position is not scored), as vLLM and SGLang answer.
    prompt_logprobs: int | None = None
    prompt_logprobs_start: int = 0
    skip_special_tokens: bool = True
    min_tokens: int = 0  # EOS and stop_token_ids are not sampled before this many output tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    structured: StructuredOutput | None = None  # the output must match this grammar

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_logit_controls(self) -> bool:
        """Something changes which tokens may come next: a grammar, a bias, a minimum length."""
        return self.structured is not None or bool(self.logit_bias) or self.min_tokens > 0

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )
