"""Turning an API request into engine requests: tokenization and the chat template, the per-request
limits (choices, output length against the context), the features this server does not offer, and
the sampling settings. The one place the HTTP layer checks a request; what the engine itself checks
(prompt length and ids, sampling ranges) comes back from it as `InvalidRequest`."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from edgeacc_ray.config import ServeConfig
from edgeacc_ray.engine.request import SamplingParams, StructuredOutput
from edgeacc_ray.http.errors import APIError
from edgeacc_ray.http.logprobs import TokenText
from edgeacc_ray.http.protocol.openai import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ResponseFormat,
    SamplingFields,
)
from edgeacc_ray.http.protocol.sglang import GenerateRequest, GenerateSamplingParams
from edgeacc_ray.http.sampling_defaults import SamplingDefaults
from edgeacc_ray.http.tool_calls import HermesTools, hermes_history

# Texts longer than this are tokenized in a thread, off the event loop every stream shares.
INLINE_TOKENIZE_CHARS = 8192
# Engine field -> SGLang /generate parameter.
_SGLANG_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "stop",
    "stop_token_ids",
    "seed",
)


@dataclass
class PreparedPrompt:
    """One prompt ready for the engine, with what the response needs to know about it."""

    ids: list[int]
    params: SamplingParams
    text: str | None = None  # the prompt as given, when it was text
    return_logprob: bool = False  # /generate
    top_logprobs_num: int = 0  # /generate
    rid: str | None = None  # /generate: the client's request id


@dataclass
class Prepared:
    """An API request as engine work: prompts, choices per prompt, and the engine's field names in
    this endpoint's terms (for error messages)."""

    prompts: list[PreparedPrompt]
    n: int
    param_names: dict[str, str] = field(default_factory=dict)
    batch: bool = False  # /generate: answer with a list
    tools: HermesTools | None = None  # chat with tools: how to find calls in the output

    def engine_requests(self, base_id: str) -> list[tuple[str, list[int], SamplingParams]]:
        """(request id, prompt ids, params) for every choice of every prompt; choice i of a seeded
        request gets seed + i so the choices differ."""
        out = []
        for k, prompt in enumerate(self.prompts):
            prompt_id = prompt.rid or (f"{base_id}-{k}" if len(self.prompts) > 1 else base_id)
            for i in range(self.n):
                params = prompt.params
                if self.n > 1 and params.seed is not None and i:
                    params = SamplingParams(**{**params.__dict__, "seed": params.seed + i})
                out.append((f"{prompt_id}-{i}" if self.n > 1 else prompt_id, prompt.ids, params))
        return out


class Preprocessor:
    def __init__(self, config: ServeConfig, tokenizer_path: str) -> None:
        from transformers import AutoTokenizer

        self.cfg = config
        self.model_name = config.model_name
        self.tokenizer_path = str(tokenizer_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        self.sampling_defaults = SamplingDefaults.of_model(self.tokenizer_path)
        self.token_text = TokenText(self.tokenizer)
        self._template_renders_tools = "tools" in str(
            getattr(self.tokenizer, "chat_template", "") or ""
        )

    # ---- shared checks ----
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                404,
                f"The model `{name}` does not exist. This server serves `{self.model_name}`.",
                param="model",
                code="model_not_found",
            )

    def _check_choices(self, ns: list[int], param: str = "n") -> None:
        """`ns`: choices asked for each prompt. Each within max_n, all together within the request limit."""
        for n in ns:
            if not 1 <= n <= self.cfg.max_n:
                raise APIError(
                    400, f"{param} must be between 1 and {self.cfg.max_n}, got {n}", param=param
                )
        total, limit = sum(ns), self.cfg.request_choices_limit
        if total > limit:
            raise APIError(
                400,
                f"this request asks for {total} generations ({len(ns)} prompt(s) x {param}); "
                f"at most {limit} per request are allowed (max_request_choices)",
                param=param,
                code="too_many_choices",
            )

    @staticmethod
    def _check_openai_fields(req: SamplingFields, unsupported: dict[str, tuple[Any, str]]) -> None:
        """What the OpenAI endpoints refuse rather than ignore."""
        for name, (noop, hint) in unsupported.items():
            value = getattr(req, name)
            if value != noop:
                raise APIError(
                    400,
                    f"{name}={json.dumps(value)[:80]} is not supported by this server{hint}",
                    param=name,
                )
        if req.stream_options is not None and not req.stream:
            raise APIError(
                400, "stream_options is only allowed when stream is true", param="stream_options"
            )
        if req.prompt_logprobs is not None and req.stream:
            raise APIError(
                400,
                "prompt_logprobs are not available when stream is true",
                param="prompt_logprobs",
            )

    async def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if len(text) <= INLINE_TOKENIZE_CHARS:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return await asyncio.to_thread(
            self.tokenizer.encode, text, add_special_tokens=add_special_tokens
        )

    @staticmethod
    def _max_tokens(
        ids: list[int],
        requested: int | None,
        max_model_len: int,
        param: str,
        prompt_param: str,
        clamp: bool = False,
    ) -> int:
        """The output bound: what was asked (at least 1), or all the room the context leaves. Past
        the context: an error (OpenAI) or clamped (SGLang). A prompt that leaves no room at all gets
        1 here and is refused by the engine with the prompt's own message."""
        room = max_model_len - len(ids)
        if requested is not None and requested < 1:
            raise APIError(400, f"{param} must be at least 1, got {requested}", param=param)
        if room < 1:
            return requested or 1
        if requested is None:
            return room
        if requested > room:
            if clamp:
                return room
            raise APIError(
                400,
                f"This model's maximum context length is {max_model_len} tokens. However, you "
                f"requested {len(ids) + requested} tokens ({len(ids)} in the {prompt_param}, {requested} "
                f"in the completion). Please reduce the length of the {prompt_param} or {param}.",
                param=param,
                code="context_length_exceeded",
            )
        return requested

    def _openai_params(
        self,
        req: SamplingFields,
        max_tokens: int,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        """`prompt_logprobs`: the prompt's top-k as the endpoint derives it (echo), else the request's
        own. Sampling fields the request leaves out take the model's defaults."""
        d = self.sampling_defaults
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=d.temperature if req.temperature is None else req.temperature,
            top_p=d.top_p if req.top_p is None else req.top_p,
            top_k=d.top_k if req.top_k is None else req.top_k,
            min_p=d.min_p if req.min_p is None else req.min_p,
            seed=req.seed,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=(
                d.repetition_penalty if req.repetition_penalty is None else req.repetition_penalty
            ),
            stop=req.stop_list(),
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs if prompt_logprobs is not None else req.prompt_logprobs,
            skip_special_tokens=req.skip_special_tokens,
            min_tokens=req.min_tokens,
            logit_bias=_token_bias(req.logit_bias, "logit_bias"),
            structured=_response_format(req.response_format),
        )

    # ---- /v1/chat/completions ----
    async def chat(self, req: ChatCompletionRequest, max_model_len: int) -> Prepared:
        self.check_model(req.model)
        self._check_openai_fields(req, UNSUPPORTED_CHAT)
        self._check_choices([req.n])
        tools = (
            HermesTools(req.tools, req.tool_choice, req.parallel_tool_calls) if req.tools else None
        )
        if tools is None and req.tool_choice not in (None, "none", "auto"):
            raise APIError(
                400, "tool_choice names a tool, but the request has no tools", param="tool_choice"
            )
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        messages = [self._message(m) for m in req.messages]
        template_kwargs = dict(req.chat_template_kwargs or {})
        if self._template_renders_tools:
            if tools is not None:
                template_kwargs["tools"] = tools.template_tools()
        elif tools is not None or any(m.tool_calls or m.role == "tool" for m in req.messages):
            messages = hermes_history(messages)
            if tools is not None:
                messages = tools.describe_in_system_prompt(messages)
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
                continue_final_message=req.continue_final_message,
                **template_kwargs,
            )
        except Exception as exc:  # jinja errors, a template that rejects the conversation
            raise APIError(
                400, f"could not apply the chat template: {exc}", param="messages"
            ) from None
        if not isinstance(text, str):
            raise APIError(400, "the chat template did not produce text", param="messages")
        ids = await self._encode(text, add_special_tokens=False)
        requested, max_param = req.requested_max_tokens()
        max_tokens = self._max_tokens(ids, requested, max_model_len, max_param, "messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self._openai_params(req, max_tokens, logprobs)
        names = {
            "prompt": "messages",
            "max_tokens": max_param,
            "logprobs": "top_logprobs",
            **_OPENAI_NAMES,
        }
        forced = tools.grammar() if tools is not None else None
        if forced is not None:
            if params.structured is not None:
                raise APIError(
                    400,
                    "response_format cannot be combined with tool_choice 'required' or a named "
                    "function",
                    param="response_format",
                )
            params.structured, names["structured"] = forced, "tools"
        if tools is not None:
            params.stop += tools.stop_strings()
        return Prepared([PreparedPrompt(ids, params)], req.n, names, tools=tools)

    @staticmethod
    def _message(m: ChatMessage) -> dict[str, Any]:
        if m.content is None or isinstance(m.content, str):
            content = m.content or ""
        else:
            parts = []
            for part in m.content:
                if part.type != "text":
                    raise APIError(
                        400,
                        f"content part type {part.type!r} is not supported (text only)",
                        param="messages",
                    )
                parts.append(part.text or "")
            content = "".join(parts)
        msg: dict[str, Any] = {"role": m.role, "content": content}
        if m.name:
            msg["name"] = m.name
        if m.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        return msg

    # ---- /v1/completions ----
    async def completions(self, req: CompletionRequest, max_model_len: int) -> Prepared:
        self.check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of other than n is not supported", param="best_of")
        self._check_openai_fields(req, UNSUPPORTED)
        # echo with logprobs: the prompt's logprobs lead the choice's (as vLLM, from prompt_logprobs if given)
        prompt_logprobs = (
            req.logprobs if req.echo and req.prompt_logprobs is None else req.prompt_logprobs
        )
        prompts = self._completion_prompts(req.prompt)
        self._check_choices([req.n] * len(prompts))
        prepared = []
        for p in prompts:
            ids = await self._encode(p, add_special_tokens=True) if isinstance(p, str) else list(p)
            max_tokens = self._max_tokens(
                ids, req.max_tokens, max_model_len, "max_tokens", "prompt"
            )
            prepared.append(
                PreparedPrompt(
                    ids,
                    self._openai_params(req, max_tokens, req.logprobs, prompt_logprobs),
                    text=p if isinstance(p, str) else None,
                )
            )
        names = {"prompt": "prompt", **_OPENAI_NAMES}
        if req.prompt_logprobs is None:
            names["prompt_logprobs"] = "logprobs"
        return Prepared(prepared, req.n, names)

    @staticmethod
    def _completion_prompts(p: str | list) -> list[str | list[int]]:
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # one tokenized prompt
        return list(p)

    # ---- /generate ----
    async def generate(self, req: GenerateRequest, max_model_len: int) -> Prepared:
        for name, noop in UNSUPPORTED_GENERATE.items():
            if getattr(req, name) != noop:
                raise APIError(400, f"{name} is not supported by this server", param=name)
        if (req.text is None) == (req.input_ids is None):
            raise APIError(400, "exactly one of `text` and `input_ids` must be given", param="text")
        prompt_param = "text" if req.text is not None else "input_ids"
        if req.text is not None:
            batch = isinstance(req.text, list)
            prompts: list[Any] = list(req.text) if batch else [req.text]
        else:
            batch = bool(req.input_ids) and isinstance(req.input_ids[0], list)
            prompts = list(req.input_ids) if batch else [req.input_ids]
        if batch and not prompts:
            raise APIError(400, "the batch is empty", param=prompt_param)
        count = len(prompts)

        def per_prompt(value: Any, default: Any, name: str) -> list[Any]:
            if isinstance(value, list):
                if len(value) != count:
                    raise APIError(
                        400, f"{name} has {len(value)} entries for {count} prompts", param=name
                    )
                return list(value)
            return [value if value is not None else default] * count

        sps = per_prompt(req.sampling_params, GenerateSamplingParams(), "sampling_params")
        rets = per_prompt(req.return_logprob, False, "return_logprob")
        starts = per_prompt(req.logprob_start_len, -1, "logprob_start_len")
        if any(ret and start < -1 for ret, start in zip(rets, starts)):
            raise APIError(
                400,
                "logprob_start_len must be -1 (output logprobs only) or the first prompt position "
                "to return logprobs for",
                param="logprob_start_len",
            )
        tops = per_prompt(req.top_logprobs_num, 0, "top_logprobs_num")
        rids = per_prompt(req.rid, None, "rid")
        self._check_choices([sp.n for sp in sps], "sampling_params.n")
        names = {
            "max_tokens": "sampling_params.max_new_tokens",
            "prompt": prompt_param,
            "logprobs": "top_logprobs_num",
            "min_tokens": "sampling_params.min_new_tokens",
            "prompt_logprobs": "top_logprobs_num",
            "prompt_logprobs_start": "logprob_start_len",
            **{f: f"sampling_params.{f}" for f in _SGLANG_FIELDS},
        }
        prepared = []
        if any(sp.json_schema or sp.regex or sp.ebnf for sp in sps):
            names["structured"] = next(
                f"sampling_params.{f}"
                for sp in sps
                for f in ("json_schema", "regex", "ebnf")
                if getattr(sp, f)
            )
        for prompt, sp, ret, top, start, rid in zip(prompts, sps, rets, tops, starts, rids):
            if ret and top < 0:
                raise APIError(
                    400, f"top_logprobs_num must be >= 0, got {top}", param="top_logprobs_num"
                )
            ids = (
                await self._encode(prompt, add_special_tokens=True)
                if isinstance(prompt, str)
                else list(prompt)
            )
            max_new = self._max_tokens(
                ids,
                sp.max_new_tokens,
                max_model_len,
                "sampling_params.max_new_tokens",
                prompt_param,
                clamp=True,
            )
            params = self._sglang_params(sp, max_new, top if ret else None)
            if ret and start >= 0:  # the prompt's logprobs from `start` on
                params.prompt_logprobs, params.prompt_logprobs_start = top, start
            for _ in range(sp.n):  # SGLang expands n into separate batch entries
                prepared.append(
                    PreparedPrompt(
                        ids,
                        params,
                        return_logprob=bool(ret),
                        top_logprobs_num=int(top or 0),
                        rid=rid if sp.n == 1 else None,
                    )
                )
        return Prepared(prepared, 1, names, batch=batch or len(prepared) > 1)

    @staticmethod
    def _sglang_params(
        sp: GenerateSamplingParams, max_new_tokens: int, logprobs: int | None
    ) -> SamplingParams:
        grammars = [
            (name, getattr(sp, name))
            for name in ("json_schema", "regex", "ebnf")
            if getattr(sp, name)
        ]
        if len(grammars) > 1:
            raise APIError(
                400,
                "give at most one of sampling_params.json_schema, regex and ebnf",
                param=f"sampling_params.{grammars[1][0]}",
            )
        if sp.no_stop_trim:
            raise APIError(
                400,
                "sampling_params.no_stop_trim is not supported",
                param="sampling_params.no_stop_trim",
            )
        if not sp.spaces_between_special_tokens:
            raise APIError(
                400,
                "sampling_params.spaces_between_special_tokens=false is not supported",
                param="sampling_params.spaces_between_special_tokens",
            )
        return SamplingParams(
            max_tokens=max_new_tokens,
            temperature=sp.temperature,
            top_p=sp.top_p,
            top_k=sp.top_k,
            min_p=sp.min_p,
            seed=sp.sampling_seed if sp.sampling_seed is not None else sp.seed,
            presence_penalty=sp.presence_penalty,
            frequency_penalty=sp.frequency_penalty,
            repetition_penalty=sp.repetition_penalty,
            stop=sp.stop_list(),
            stop_token_ids=list(sp.stop_token_ids or []),
            ignore_eos=sp.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=sp.skip_special_tokens,
            min_tokens=sp.min_new_tokens,
            logit_bias=_token_bias(sp.logit_bias, "sampling_params.logit_bias"),
            structured=StructuredOutput(*grammars[0]) if grammars else None,
        )


_OPENAI_NAMES = {"structured": "response_format"}
_GRAMMAR_HINT = ": use response_format (json_schema, json_object)"
# OpenAI / vLLM parameters that change the output and are not implemented: name -> (the value that
# changes nothing, a hint). Any other value is refused with a 400 naming the parameter.
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "spaces_between_special_tokens": (True, ""),
    "include_stop_str_in_output": (False, ""),
    "use_beam_search": (False, ""),
    "length_penalty": (1.0, ""),
    "truncate_prompt_tokens": (None, ""),
    "allowed_token_ids": (None, ": use logit_bias"),
    "bad_words": (None, ": use logit_bias"),
    "guided_json": (None, _GRAMMAR_HINT),
    "guided_regex": (None, _GRAMMAR_HINT),
    "guided_choice": (None, _GRAMMAR_HINT),
    "guided_grammar": (None, _GRAMMAR_HINT),
    "structured_outputs": (None, _GRAMMAR_HINT),
    "logits_processors": (None, ""),
    "return_tokens_as_token_ids": (False, ""),
}
UNSUPPORTED_GENERATE: dict[str, Any] = {
    name: None
    for name in (
        "input_embeds",
        "image_data",
        "audio_data",
        "video_data",
        "lora_path",
        "custom_logit_processor",
        "token_ids_logprob",
        "session_params",
    )
} | {"return_hidden_states": False}
UNSUPPORTED_CHAT = {
    **UNSUPPORTED,
    "functions": (None, ": use tools"),
    "function_call": (None, ": use tool_choice"),
    "echo": (False, ""),
}


def _token_bias(bias: dict[str, float] | None, param: str) -> dict[int, float]:
    """OpenAI's and SGLang's logit_bias keys are token ids written as strings."""
    out = {}
    for key, value in (bias or {}).items():
        try:
            out[int(key)] = float(value)
        except ValueError:
            raise APIError(
                400, f"{param} keys must be token ids, got {key!r}", param=param
            ) from None
    return out


def _response_format(fmt: ResponseFormat | None) -> StructuredOutput | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutput("json_object")
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise APIError(
            400, "response_format json_schema needs json_schema.schema", param="response_format"
        )
    return StructuredOutput("json_schema", json.dumps(fmt.json_schema.schema_))
