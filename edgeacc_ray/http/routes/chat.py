"""POST /v1/chat/completions (OpenAI), streaming and not."""

from __future__ import annotations

from typing import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from edgeacc_ray.http.context import ApiContext
from edgeacc_ray.http.engine_request import EngineRequest, collect_all, merge
from edgeacc_ray.http.logprobs import chat_logprobs, vllm_prompt_logprobs
from edgeacc_ray.http.protocol.common import StreamUsage, new_id, now, usage_dict
from edgeacc_ray.http.protocol.openai import ChatCompletionRequest
from edgeacc_ray.http.sse import SSE_DONE, sse
from edgeacc_ray.http.tool_calls import HermesTools, ToolCallStream


def router(ctx: ApiContext) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest) -> Response:
        prepared = await ctx.pre.chat(req, ctx.max_model_len())
        rid = new_id("chatcmpl")
        reqs = await ctx.start(prepared, rid)
        prompt_len = len(prepared.prompts[0].ids)
        top_n = prepared.prompts[0].params.logprobs
        tools = (
            prepared.tools if prepared.tools is not None and prepared.tools.parses_calls else None
        )
        created = now()
        if req.stream:
            return ctx.stream(
                _events(ctx, rid, created, reqs, prompt_len, StreamUsage.of(req), top_n, tools)
            )
        results = await collect_all(reqs)
        choices = []
        for i, res in enumerate(results):
            message: dict = {"role": "assistant", "content": res.text}
            finish_reason = res.finish_reason
            if tools is not None:
                content, calls = tools.parse(tools.untrim(res.text, res.stop_reason))
                if calls:
                    message = {
                        "role": "assistant",
                        "content": content,
                        "tool_calls": [c.to_openai() for c in calls],
                    }
                    finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
            choice = {
                "index": i,
                "message": message,
                "logprobs": (
                    {"content": chat_logprobs(res.logprobs or [], ctx.pre.token_text, top_n)}
                    if top_n is not None
                    else None
                ),
                "finish_reason": finish_reason,
            }
            if res.stop_reason is not None and finish_reason != "tool_calls":
                choice["stop_reason"] = res.stop_reason
            choices.append(choice)
        usage = usage_dict(
            prompt_len,
            sum(len(r.token_ids) for r in results),
            min(prompt_len, max(r.num_cached_tokens for r in results)),
        )
        body = {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": ctx.model_name,
            "choices": choices,
            "usage": usage,
        }
        if (
            req.prompt_logprobs is not None
        ):  # vLLM's extra, on the response (every choice has the same prompt)
            body["prompt_logprobs"] = vllm_prompt_logprobs(
                prepared.prompts[0].ids, results[0].prompt_logprobs, ctx.pre.token_text
            )
        return JSONResponse(body)

    return api


async def _events(
    ctx: ApiContext,
    rid: str,
    created: int,
    reqs: list[EngineRequest],
    prompt_len: int,
    usage: StreamUsage,
    top_n: int | None,
    tools: HermesTools | None,
) -> AsyncIterator[str]:
    base = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": ctx.model_name,
    }
    if usage.final:
        base["usage"] = None
    completion = [0] * len(reqs)
    cached = [0] * len(reqs)
    for i in range(len(reqs)):
        yield sse(
            usage.add(
                {
                    **base,
                    "choices": [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                },
                prompt_len,
                0,
                0,
            )
        )
    calls = [ToolCallStream(tools) for _ in reqs] if tools is not None else None
    merged = merge(reqs)
    try:
        async for i, chunk in merged:
            completion[i] += len(chunk.token_ids)
            cached[i] = chunk.num_cached_tokens or cached[i]
            text, finish_reason = chunk.text, chunk.finish_reason
            delta: dict = {}
            if (
                calls is not None
            ):  # content flows until a tool call may begin; calls go out whole at the end
                text = calls[i].feed(chunk.text)
                if chunk.finished:
                    rest, found = calls[i].finish(chunk.stop_reason)
                    text += rest
                    if found:
                        delta["tool_calls"] = [c.to_openai(index=j) for j, c in enumerate(found)]
                        finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
            if text:
                delta = {"content": text, **delta}
            if not delta and not chunk.finished and not chunk.logprobs:
                continue
            choice = {
                "index": i,
                "delta": delta,
                "logprobs": (
                    {"content": chat_logprobs(chunk.logprobs or [], ctx.pre.token_text, top_n)}
                    if top_n is not None
                    else None
                ),
                "finish_reason": finish_reason if chunk.finished else None,
            }
            if chunk.finished and chunk.stop_reason is not None and finish_reason != "tool_calls":
                choice["stop_reason"] = chunk.stop_reason
            yield sse(
                usage.add({**base, "choices": [choice]}, prompt_len, completion[i], cached[i])
            )
    finally:
        await merged.aclose()
    if usage.final:
        yield sse(
            {
                **base,
                "choices": [],
                "usage": usage_dict(prompt_len, sum(completion), min(prompt_len, max(cached))),
            }
        )
    yield SSE_DONE
