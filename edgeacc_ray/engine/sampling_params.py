"""Per-request sampling settings, validated once when a request enters the engine."""
from __future__ import annotations

from dataclasses import dataclass, field


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
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def validate(self, vocab_size: int, max_logprobs: int = 20) -> None:
        """Raise ValueError naming the first invalid field."""
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be at least 1, got {max_tokens}"),
            (self.temperature >= 0.0, "temperature must be >= 0, got {temperature}"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1], got {top_p}"),
            (self.top_k == -1 or self.top_k >= 0, "top_k must be -1 (disabled) or >= 0, got {top_k}"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1], got {min_p}"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2], got {presence_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2], got {frequency_penalty}"),
            (self.repetition_penalty > 0.0, "repetition_penalty must be > 0, got {repetition_penalty}"),
            (self.logprobs is None or 0 <= self.logprobs <= max_logprobs,
             f"logprobs must be between 0 and {max_logprobs}, got {{logprobs}}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be a list of non-empty strings"),
            (all(isinstance(t, int) and 0 <= t < vocab_size for t in self.stop_token_ids),
             f"stop_token_ids must be token ids in [0, {vocab_size})"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message.format(**self.__dict__))
