"""Our `SamplingParams` -> SGLang's request arguments: the `sampling_params` dict
(`python/sglang/srt/sampling/sampling_params.py`, SamplingParams fields in 0.5.23) and the logprob
arguments of `Engine.async_generate` (return_logprob, top_logprobs_num, logprob_start_len).

`n` never reaches the engine side: the Ingress starts one engine request per choice, so each SGLang
request is sent with n = 1.
"""

from __future__ import annotations

from typing import Any

from edgeacc_ray.engine.request import (
    ANY_JSON_SCHEMA,
    InvalidRequest,
    SamplingParams,
    StructuredOutput,
)

TOP_K_ALL = -1  # SGLang: -1 (normalized to its TOP_K_ALL) samples from the whole vocabulary
NO_PROMPT_LOGPROBS = -1  # logprob_start_len: the prompt's logprobs are not computed


def grammar_fields(so: StructuredOutput) -> dict[str, str]:
    """One of SGLang's json_schema / regex / ebnf. The engine runs with grammar_backend=llguidance, whose
    `ebnf` takes GBNF and Lark alike (llguidance.grammar_from("ebnf", ...) passes Lark through)."""
    if so.kind == "json_schema":
        return {"json_schema": so.spec}
    if so.kind == "json_object":
        return {"json_schema": ANY_JSON_SCHEMA}
    if so.kind == "regex":
        return {"regex": so.spec}
    if so.kind in ("ebnf", "lark"):
        return {"ebnf": so.spec}
    raise InvalidRequest(
        "structured", f"structured output of kind {so.kind!r} is not supported by SGLang"
    )


def sampling_params(params: SamplingParams) -> dict[str, Any]:
    """SGLang's `sampling_params` for one choice."""
    out: dict[str, Any] = {
        "max_new_tokens": params.max_tokens,
        "min_new_tokens": params.min_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else TOP_K_ALL,
        "min_p": params.min_p,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "repetition_penalty": params.repetition_penalty,
        "ignore_eos": params.ignore_eos,
        "skip_special_tokens": params.skip_special_tokens,
        "n": 1,
    }
    if params.stop:
        out["stop"] = list(params.stop)
    if params.stop_token_ids:
        out["stop_token_ids"] = list(params.stop_token_ids)
    if params.logit_bias:  # SGLang's keys are token ids as strings (they cross as JSON)
        out["logit_bias"] = {str(token): bias for token, bias in params.logit_bias.items()}
    if params.seed is not None:
        out["sampling_seed"] = params.seed
    if params.structured is not None:
        out.update(grammar_fields(params.structured))
    return out


def logprob_args(params: SamplingParams) -> dict[str, Any]:
    """`async_generate`'s logprob arguments: the chosen token's logprob (and the top k) of each output token.
    Prompt logprobs are refused: SGLang's input logprobs are not carried back into our outputs here."""
    if params.prompt_logprobs is not None:
        raise InvalidRequest(
            "prompt_logprobs", "prompt logprobs are not supported with the SGLang engine backend"
        )
    if params.logprobs is None:
        return {"return_logprob": False}
    return {
        "return_logprob": True,
        "top_logprobs_num": params.logprobs,
        "logprob_start_len": NO_PROMPT_LOGPROBS,
    }
