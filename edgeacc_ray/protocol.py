"""HTTP request and response shapes: OpenAI (/v1/chat/completions, /v1/completions) and SGLang (/generate).

Requests are pydantic models (unknown OpenAI fields are ignored, as OpenAI-compatible servers do);
each request turns into one or more `(prompt, SamplingParams)` pairs. Responses are plain dicts built
by small functions, so the streaming path stays cheap.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from edgeacc_ray.engine.sampling_params import SamplingParams


class APIError(Exception):
    """An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param
        self.code = code if code is not None else status
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


class EngineRequestError(ValueError):
    """The engine refused a request (bad input); the message says why. Answered with HTTP 400."""


class EngineUnavailable(RuntimeError):
    """The engine side cannot take requests now (not placed yet, dead, overloaded). HTTP 503."""


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---------------------------------------------------------------------------------------------
# OpenAI requests
# ---------------------------------------------------------------------------------------------


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class StreamOptions(_Lenient):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.type != "text":
                raise APIError(400, f"content part type {part.type!r} is not supported (text only)", param="messages")
            parts.append(part.text or "")
        return "".join(parts)


class _SamplingFields(_Lenient):
    """Fields shared by chat and completions (OpenAI names plus the usual vLLM/SGLang extensions)."""

    model: str | None = None
    n: int = 1
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_k(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # one tokenized prompt
        if all(isinstance(x, str) for x in p) or all(isinstance(x, list) for x in p):
            return list(p)
        raise APIError(400, "prompt must be a string, a list of strings, or token ids", param="prompt")


# ---------------------------------------------------------------------------------------------
# SGLang /generate
# ---------------------------------------------------------------------------------------------


class GenerateSamplingParams(BaseModel):
    """SGLang's sampling parameters (names and defaults as `sglang.srt.sampling.sampling_params`)."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    n: int = 1
    sampling_seed: int | None = None
    seed: int | None = None
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    logit_bias: dict[str, float] | None = None
    custom_params: dict[str, Any] | None = None

    def to_engine(self, logprobs: int | None) -> SamplingParams:
        for name in ("json_schema", "regex", "ebnf"):
            if getattr(self, name) is not None:
                raise APIError(400, f"sampling_params.{name}: constrained decoding is not supported",
                               param=f"sampling_params.{name}")
        if self.min_new_tokens:
            raise APIError(400, "sampling_params.min_new_tokens is not supported",
                           param="sampling_params.min_new_tokens")
        if self.no_stop_trim:
            raise APIError(400, "sampling_params.no_stop_trim is not supported", param="sampling_params.no_stop_trim")
        if self.logit_bias:
            raise APIError(400, "sampling_params.logit_bias is not supported", param="sampling_params.logit_bias")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.sampling_seed if self.sampling_seed is not None else self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: Union[str, list[str], None] = None
    input_ids: Union[list[int], list[list[int]], None] = None
    sampling_params: Union[GenerateSamplingParams, list[GenerateSamplingParams], None] = None
    stream: bool = False
    return_logprob: Union[bool, list[bool]] = False
    logprob_start_len: Union[int, list[int]] = -1
    top_logprobs_num: Union[int, list[int]] = 0
    return_text_in_logprobs: bool = False
    rid: Union[str, list[str], None] = None

    def items(self) -> tuple[bool, list[tuple[str | list[int], GenerateSamplingParams, bool, int, str | None]]]:
        """(is_batch, [(prompt, sampling params, return_logprob, top_logprobs_num, rid)])."""
        if (self.text is None) == (self.input_ids is None):
            raise APIError(400, "exactly one of `text` and `input_ids` must be given", param="text")
        if self.text is not None:
            batch = isinstance(self.text, list)
            prompts: list[Any] = list(self.text) if batch else [self.text]
        else:
            ids = self.input_ids
            batch = bool(ids) and isinstance(ids[0], list)
            prompts = list(ids) if batch else [ids]
        if batch and not prompts:
            raise APIError(400, "the batch is empty", param="text")
        n = len(prompts)

        def per_item(value: Any, default: Any, name: str) -> list[Any]:
            if isinstance(value, list):
                if len(value) != n:
                    raise APIError(400, f"{name} has {len(value)} entries for {n} prompts", param=name)
                return list(value)
            return [value if value is not None else default] * n

        sps = per_item(self.sampling_params, GenerateSamplingParams(), "sampling_params")
        rets = per_item(self.return_logprob, False, "return_logprob")
        tops = per_item(self.top_logprobs_num, 0, "top_logprobs_num")
        rids = per_item(self.rid, None, "rid")
        items = []
        for prompt, sp, ret, top, rid in zip(prompts, sps, rets, tops, rids):
            copies = max(sp.n, 1)
            if copies > 1:
                batch = True
            for _ in range(copies):
                items.append((prompt, sp, bool(ret), int(top or 0), rid if copies == 1 else None))
        return batch, items


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def now() -> int:
    return int(time.time())


class TokenText:
    """Token id -> its text for logprob entries, cached (tokens decode one at a time like vLLM)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            if len(self.cache) < 200_000:
                self.cache[token_id] = text
        return text


def chat_logprobs(logprobs, token_text: TokenText, top_n: int) -> list[dict[str, Any]]:
    out = []
    for lp in logprobs:
        tok = token_text(lp.token_id)
        out.append({
            "token": tok,
            "logprob": max(lp.logprob, -9999.0),
            "bytes": list(tok.encode("utf-8")),
            "top_logprobs": [
                {"token": (t := token_text(tid)), "logprob": max(v, -9999.0), "bytes": list(t.encode("utf-8"))}
                for tid, v in lp.top[:top_n]
            ],
        })
    return out


def completion_logprobs(logprobs, token_text: TokenText, top_n: int, text_offset: int) -> dict[str, Any]:
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for lp in logprobs:
        tok = token_text(lp.token_id)
        tokens.append(tok)
        token_logprobs.append(max(lp.logprob, -9999.0))
        tops.append({token_text(tid): max(v, -9999.0) for tid, v in lp.top[:top_n]} if top_n else None)
        offsets.append(text_offset)
        text_offset += len(tok)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def sglang_finish_reason(reason: str | None, stop_reason: Any, max_new_tokens: int,
                         last_token: int | None) -> dict[str, Any] | None:
    if reason is None:
        return None
    if reason == "length":
        return {"type": "length", "length": max_new_tokens}
    if reason == "stop":
        return {"type": "stop", "matched": stop_reason if stop_reason is not None else last_token}
    return {"type": "abort", "message": str(stop_reason or "aborted")}


Endpoint = Literal["chat", "completions", "generate"]
