"""POST /generate (SGLang-native): one prompt or a batch, text or token ids, streaming (cumulative
text, as SGLang) and not."""

from __future__ import annotations

import time
from typing import Any, AsyncIterator

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from edgeacc_ray.engine.request import RequestOutput, merge_outputs
from edgeacc_ray.http.context import ApiContext
from edgeacc_ray.http.engine_request import EngineRequest, collect_all, merge
from edgeacc_ray.http.logprobs import sglang_input_logprobs, sglang_logprobs
from edgeacc_ray.http.preprocess import PreparedPrompt
from edgeacc_ray.http.protocol.common import new_id
from edgeacc_ray.http.protocol.sglang import GenerateRequest, sglang_finish_reason
from edgeacc_ray.http.sse import SSE_DONE, sse


def router(ctx: ApiContext) -> APIRouter:
    api = APIRouter()

    @api.post("/generate")
    async def generate(req: GenerateRequest) -> Response:
        t0 = time.perf_counter()
        prepared = await ctx.pre.generate(req, ctx.max_model_len())
        reqs = await ctx.start(prepared, new_id("gen"))
        prompts, lp_text = prepared.prompts, req.return_text_in_logprobs
        if req.stream:
            return ctx.stream(_events(ctx, reqs, prompts, prepared.batch, t0, lp_text))
        results = await collect_all(reqs)
        outs = [_result(ctx, r, res, p, t0, lp_text) for r, res, p in zip(reqs, results, prompts)]
        return JSONResponse(outs if prepared.batch else outs[0])

    return api


def _result(
    ctx: ApiContext,
    r: EngineRequest,
    res: RequestOutput,
    prompt: PreparedPrompt,
    t0: float,
    lp_text: bool,
) -> dict[str, Any]:
    last = res.token_ids[-1] if res.token_ids else None
    meta = {
        "id": r.request_id,
        "finish_reason": sglang_finish_reason(
            res.finish_reason, res.stop_reason, prompt.params.max_tokens, last
        ),
        "prompt_tokens": r.prompt_len,
        "completion_tokens": len(res.token_ids),
        "cached_tokens": res.num_cached_tokens,
        "e2e_latency": time.perf_counter() - t0,
        "weight_version": "default",
    }
    if prompt.return_logprob:
        text_of = ctx.pre.token_text if lp_text else None
        start = (
            prompt.params.prompt_logprobs_start if prompt.params.prompt_logprobs is not None else -1
        )
        meta.update(
            sglang_input_logprobs(
                prompt.ids, start, res.prompt_logprobs, text_of, prompt.top_logprobs_num
            )
        )
        meta.update(sglang_logprobs(res.logprobs or [], text_of, prompt.top_logprobs_num))
    return {"text": res.text, "output_ids": list(res.token_ids), "meta_info": meta}


async def _events(
    ctx: ApiContext,
    reqs: list[EngineRequest],
    prompts: list[PreparedPrompt],
    batch: bool,
    t0: float,
    lp_text: bool,
) -> AsyncIterator[str]:
    acc: list[RequestOutput | None] = [None] * len(reqs)
    merged = merge(reqs)
    try:
        async for i, chunk in merged:
            acc[i] = merge_outputs(acc[i], chunk)
            if not chunk.text and not chunk.finished and not chunk.logprobs:
                continue
            out = _result(ctx, reqs[i], acc[i], prompts[i], t0, lp_text)
            if not chunk.finished:
                out["meta_info"]["finish_reason"] = None
            if batch:
                out["index"] = i
            yield sse(out)
    finally:
        await merged.aclose()
    yield SSE_DONE
