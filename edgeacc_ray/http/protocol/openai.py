"""OpenAI request shapes: /v1/chat/completions and /v1/completions, with the usual vLLM/SGLang
extensions (top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids, ...)."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import ConfigDict, Field

from edgeacc_ray.http.protocol.common import RequestModel

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class StreamOptions(RequestModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ContentPart(RequestModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class FunctionCall(RequestModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(RequestModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(RequestModel):
    model_config = ConfigDict(extra="allow")
    role: Role
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool's answer


class FunctionDefinition(RequestModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: no arguments
    strict: bool | None = None


class Tool(RequestModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedToolChoice(RequestModel):
    class Function(RequestModel):
        name: str

    type: Literal["function"] = "function"
    function: Function


class JsonSchemaFormat(RequestModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestModel):
    """`{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {...}}`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(RequestModel):
    """Fields chat and completions share."""

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
    prompt_logprobs: int | None = (
        None  # vLLM: logprobs of the prompt tokens (top k), not with stream
    )
    min_tokens: int = 0
    response_format: ResponseFormat | None = None  # on completions too, as vLLM
    # vLLM parameters this server does not implement, declared so that a request setting them is
    # refused with a 400 naming them (preprocess.UNSUPPORTED), not silently dropped as unknown fields.
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    use_beam_search: bool = False
    length_penalty: float = 1.0
    truncate_prompt_tokens: int | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None
    logits_processors: list[Any] | None = None
    return_tokens_as_token_ids: bool = False

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    # Not implemented (refused with a 400, preprocess.UNSUPPORTED): OpenAI's deprecated functions, vLLM's echo.
    functions: list[Any] | None = None
    function_call: Any = None
    echo: bool = False

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """The output bound asked for and the name of the parameter that asked."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
