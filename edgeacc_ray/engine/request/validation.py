"""The one check of a request against what the engine can run: prompt length and token ids against
the model, sampling settings against their ranges. The engine runs it when a request arrives; the
HTTP layer only maps its `InvalidRequest` to an API error."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from edgeacc_ray.engine.request.errors import InvalidRequest
from edgeacc_ray.engine.request.sampling_params import SamplingParams

MAX_STOP_STRINGS = 16  # per request; each is searched for after every token
MAX_STOP_LENGTH = 256  # characters; the longest stop string is held back from the stream
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's limit
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed accepts


@dataclass(frozen=True)
class RequestLimits:
    """What a request is checked against: the served model's context and vocabulary, and the KV
    pool's capacity (which caps max_model_len: a request's KV never outgrows the pool)."""

    max_model_len: int
    vocab_size: int
    max_logprobs: int
    kv_capacity_tokens: int


def validate_request(
    prompt_token_ids: list[int], params: SamplingParams, limits: RequestLimits
) -> None:
    """Raise InvalidRequest naming the first thing the engine cannot run."""
    n, limit = len(prompt_token_ids), limits.max_model_len
    if n == 0:
        raise InvalidRequest("prompt", "the prompt is empty: give at least one token")
    if n >= limit and limit == limits.kv_capacity_tokens:
        raise InvalidRequest(
            "prompt",
            f"The server's KV cache holds {limit} tokens, which is this model's maximum "
            f"context length here. Your prompt has {n} tokens, which leaves no room for output (at "
            f"most {limit - 1} prompt tokens). Please reduce the length of the prompt.",
            "exceeds_kv_capacity",
        )
    if n >= limit:
        raise InvalidRequest(
            "prompt",
            f"This model's maximum context length (max_model_len) is {limit} tokens. Your prompt "
            f"has {n} tokens, which leaves no room for output (at most {limit - 1} prompt tokens). "
            "Please reduce the length of the prompt.",
            "context_length_exceeded",
        )
    vocab = limits.vocab_size
    bad = [t for t in prompt_token_ids if not isinstance(t, numbers.Integral) or not 0 <= t < vocab]
    if bad:
        raise InvalidRequest(
            "prompt", f"the prompt has token ids outside the vocabulary [0, {vocab}): {bad[:5]}"
        )
    _validate_params(params, limits)
    if params.prompt_logprobs is not None and not 0 <= params.prompt_logprobs_start < n:
        raise InvalidRequest(
            "prompt_logprobs_start",
            f"the first prompt token to score must be in [0, {n}) for "
            f"this {n}-token prompt, got {params.prompt_logprobs_start}",
        )


def _validate_params(p: SamplingParams, limits: RequestLimits) -> None:
    checks = [
        (
            "max_tokens",
            isinstance(p.max_tokens, int) and p.max_tokens >= 1,
            f"max_tokens must be at least 1, got {p.max_tokens}",
        ),
        ("temperature", p.temperature >= 0.0, f"temperature must be >= 0, got {p.temperature}"),
        ("top_p", 0.0 < p.top_p <= 1.0, f"top_p must be in (0, 1], got {p.top_p}"),
        (
            "top_k",
            p.top_k == -1 or p.top_k >= 0,
            f"top_k must be -1 (disabled) or >= 0, got {p.top_k}",
        ),
        ("min_p", 0.0 <= p.min_p <= 1.0, f"min_p must be in [0, 1], got {p.min_p}"),
        (
            "presence_penalty",
            -2.0 <= p.presence_penalty <= 2.0,
            f"presence_penalty must be in [-2, 2], got {p.presence_penalty}",
        ),
        (
            "frequency_penalty",
            -2.0 <= p.frequency_penalty <= 2.0,
            f"frequency_penalty must be in [-2, 2], got {p.frequency_penalty}",
        ),
        (
            "repetition_penalty",
            p.repetition_penalty > 0.0,
            f"repetition_penalty must be > 0, got {p.repetition_penalty}",
        ),
        (
            "seed",
            p.seed is None or SEED_RANGE[0] <= p.seed < SEED_RANGE[1],
            f"seed must be an integer in [-2**63, 2**64), got {p.seed}",
        ),
        (
            "logprobs",
            p.logprobs is None or 0 <= p.logprobs <= limits.max_logprobs,
            f"logprobs must be between 0 and {limits.max_logprobs}, got {p.logprobs}",
        ),
        (
            "prompt_logprobs",
            p.prompt_logprobs is None or 0 <= p.prompt_logprobs <= limits.max_logprobs,
            f"prompt_logprobs must be between 0 and {limits.max_logprobs}, got {p.prompt_logprobs}",
        ),
        (
            "stop",
            all(isinstance(s, str) and s for s in p.stop),
            "stop must be a list of non-empty strings",
        ),
        (
            "stop",
            len(p.stop) <= MAX_STOP_STRINGS,
            f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(p.stop)}",
        ),
        (
            "stop",
            all(len(s) <= MAX_STOP_LENGTH for s in p.stop),
            f"stop strings must be at most {MAX_STOP_LENGTH} characters long",
        ),
        (
            "stop_token_ids",
            len(p.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
            f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids are allowed, got {len(p.stop_token_ids)}",
        ),
        (
            "stop_token_ids",
            all(isinstance(t, int) and 0 <= t < limits.vocab_size for t in p.stop_token_ids),
            f"stop_token_ids must be token ids in [0, {limits.vocab_size})",
        ),
        (
            "min_tokens",
            isinstance(p.min_tokens, int) and 0 <= p.min_tokens <= p.max_tokens,
            f"min_tokens must be between 0 and max_tokens ({p.max_tokens}), got {p.min_tokens}",
        ),
        (
            "logit_bias",
            len(p.logit_bias) <= MAX_LOGIT_BIAS_ENTRIES,
            f"logit_bias may hold at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(p.logit_bias)}",
        ),
        (
            "logit_bias",
            all(isinstance(t, int) and 0 <= t < limits.vocab_size for t in p.logit_bias),
            f"logit_bias keys must be token ids in [0, {limits.vocab_size})",
        ),
        (
            "logit_bias",
            all(-100.0 <= v <= 100.0 for v in p.logit_bias.values()),
            "logit_bias values must be in [-100, 100]",
        ),
    ]
    for field, ok, message in checks:
        if not ok:
            raise InvalidRequest(field, message)
