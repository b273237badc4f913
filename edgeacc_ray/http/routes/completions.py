"""POST /v1/completions (OpenAI), streaming and not, with batches of prompts, `n` and `echo`."""

from __future__ import annotations

from typing import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from edgeacc_ray.http.context import ApiContext
from edgeacc_ray.http.engine_request import EngineRequest, collect_all, merge
from edgeacc_ray.http.logprobs import (
    completion_logprobs,
    echo_logprobs,
    join_logprobs,
    vllm_prompt_logprobs,
)
from edgeacc_ray.http.preprocess import PreparedPrompt
from edgeacc_ray.http.protocol.common import StreamUsage, new_id, now, usage_dict
from edgeacc_ray.http.protocol.openai import CompletionRequest
from edgeacc_ray.http.sse import SSE_DONE, sse


def router(ctx: ApiContext) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Response:
        prepared = await ctx.pre.completions(req, ctx.max_model_len())
        rid = new_id("cmpl")
        reqs = await ctx.start(prepared, rid)
        created, n = now(), prepared.n
        echoes = [
            (p.text if p.text is not None else ctx.pre.tokenizer.decode(p.ids)) if req.echo else ""
            for p in prepared.prompts
        ]
        prompt_lens = [len(p.ids) for p in prepared.prompts]
        if req.stream:
            return ctx.stream(
                _events(
                    ctx,
                    rid,
                    created,
                    reqs,
                    n,
                    prepared.prompts,
                    echoes,
                    StreamUsage.of(req),
                    req.logprobs,
                )
            )
        results = await collect_all(reqs)
        choices = []
        for i, res in enumerate(results):
            echo, prompt_ids = echoes[i // n], prepared.prompts[i // n].ids
            logprobs = None
            if req.logprobs is not None:
                logprobs = completion_logprobs(
                    res.logprobs or [], ctx.pre.token_text, req.logprobs, len(echo)
                )
                if req.echo:
                    logprobs = join_logprobs(
                        echo_logprobs(
                            prompt_ids, res.prompt_logprobs or [], ctx.pre.token_text, req.logprobs
                        ),
                        logprobs,
                    )
            choice = {
                "index": i,
                "text": echo + res.text,
                "logprobs": logprobs,
                "finish_reason": res.finish_reason,
            }
            if req.prompt_logprobs is not None:  # vLLM's extra
                choice["prompt_logprobs"] = vllm_prompt_logprobs(
                    prompt_ids, res.prompt_logprobs, ctx.pre.token_text
                )
            if res.stop_reason is not None:
                choice["stop_reason"] = res.stop_reason
            choices.append(choice)
        cached = sum(
            min(prompt_lens[k], max(results[k * n + j].num_cached_tokens for j in range(n)))
            for k in range(len(prompt_lens))
        )
        usage = usage_dict(sum(prompt_lens), sum(len(r.token_ids) for r in results), cached)
        return JSONResponse(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": ctx.model_name,
                "choices": choices,
                "usage": usage,
            }
        )

    return api


async def _events(
    ctx: ApiContext,
    rid: str,
    created: int,
    reqs: list[EngineRequest],
    n: int,
    prompts: list[PreparedPrompt],
    echoes: list[str],
    usage: StreamUsage,
    top_n: int | None,
) -> AsyncIterator[str]:
    """Echo with logprobs: a choice's first chunk carries the echoed prompt and its logprobs."""
    base = {"id": rid, "object": "text_completion", "created": created, "model": ctx.model_name}
    prompt_lens = [len(p.ids) for p in prompts]
    if usage.final:
        base["usage"] = None
    completion = [0] * len(reqs)
    cached = [0] * len(reqs)
    offsets = [len(echoes[i // n]) for i in range(len(reqs))]
    pending_echo = [echoes[i // n] for i in range(len(reqs))]
    merged = merge(reqs)
    try:
        async for i, chunk in merged:
            completion[i] += len(chunk.token_ids)
            cached[i] = chunk.num_cached_tokens or cached[i]
            text = pending_echo[i] + chunk.text
            pending_echo[i] = ""
            if not text and not chunk.finished and not chunk.logprobs:
                continue
            lp = None
            if top_n is not None:
                lp = completion_logprobs(
                    chunk.logprobs or [], ctx.pre.token_text, top_n, offsets[i]
                )
                offsets[i] += len(chunk.text)
                if chunk.prompt_logprobs is not None:  # only echo asks for them in a stream
                    lp = join_logprobs(
                        echo_logprobs(
                            prompts[i // n].ids, chunk.prompt_logprobs, ctx.pre.token_text, top_n
                        ),
                        lp,
                    )
            choice = {
                "index": i,
                "text": text,
                "logprobs": lp,
                "finish_reason": chunk.finish_reason if chunk.finished else None,
            }
            if chunk.finished and chunk.stop_reason is not None:
                choice["stop_reason"] = chunk.stop_reason
            yield sse(
                usage.add(
                    {**base, "choices": [choice]}, prompt_lens[i // n], completion[i], cached[i]
                )
            )
    finally:
        await merged.aclose()
    if usage.final:
        cached_total = sum(
            min(prompt_lens[k], max(cached[k * n : (k + 1) * n])) for k in range(len(prompt_lens))
        )
        yield sse(
            {
                **base,
                "choices": [],
                "usage": usage_dict(sum(prompt_lens), sum(completion), cached_total),
            }
        )
    yield SSE_DONE
