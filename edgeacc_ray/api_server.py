"""The HTTP API (OpenAI + SGLang-native) over any engine client, as one FastAPI app.

`ApiServer(config, client, tokenizer_path).app` is the ASGI app the Serve Ingress exposes. The client
is anything with `model_info()`, `generate(request_id, prompt_token_ids, params)` (async iterator of
`RequestOutput` chunks), `stats()` and `flush_cache()` — see `deployments/engine_client.py`.

Here: tokenization and the chat template, validation against the model's limits, fan-out for `n`,
SSE framing, usage and logprobs, errors in OpenAI's shape and the request-level metrics. The API key
and body-size guard is `http_guard.py`; one engine request's life (first chunk up front, metrics,
abort on close) is `request_stream.py`. Detokenization is the engine's (incremental, UTF-8 safe, stop strings applied).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgeacc_ray.config import ServeConfig
from edgeacc_ray.engine.sampling_params import SamplingParams
from edgeacc_ray.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    TokenText,
    chat_logprobs,
    completion_logprobs,
    new_id,
    now,
    sglang_finish_reason,
    usage_dict,
)
from edgeacc_ray.http_guard import ApiGuard
from edgeacc_ray.request_stream import SAMPLING_FIELDS, Collected, EngineRequest, merge, start_all
from edgeacc_ray.server_metrics import ServerMetrics

logger = logging.getLogger("ray.serve")

SSE_DONE = "data: [DONE]\n\n"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _sse(obj: Any) -> str:
    return "data: " + _dumps(obj) + "\n\n"


class ApiServer:
    """The FastAPI app and the state behind it (one per Ingress replica)."""

    def __init__(self, config: ServeConfig, client, tokenizer_path: str):
        from transformers import AutoTokenizer

        self.cfg = config
        self.client = client
        self.model_name = config.model_name
        self.tokenizer_path = str(tokenizer_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        self.token_text = TokenText(self.tokenizer)
        self.metrics = ServerMetrics(self.model_name)
        self.info: dict[str, Any] | None = None
        self.created = now()
        self._ready_task: asyncio.Task | None = None
        self.app = self._build_app()

    # ---- readiness ---------------------------------------------------------------------------
    async def wait_ready(self) -> None:
        """Fetch the engine's model info, retrying until the engine side is up."""
        delay = 0.2
        while self.info is None:
            try:
                self.info = await asyncio.wait_for(self.client.model_info(), timeout=60)
                logger.info("engine ready: %s", self.info)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # not placed yet, still loading, restarting
                logger.info("engine not ready yet (%s: %s)", type(exc).__name__, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def start(self) -> None:
        if self._ready_task is None:
            self._ready_task = asyncio.ensure_future(self.wait_ready())

    def _require_ready(self) -> dict[str, Any]:
        if self.info is None:
            raise APIError(503, "the server is not ready yet: the engine is still starting (loading the model)",
                           type="service_unavailable", code="not_ready", headers={"Retry-After": "2"})
        return self.info

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist. This server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    # ---- request preparation -----------------------------------------------------------------
    def _check_prompt(self, ids: list[int], param: str) -> None:
        info = self._require_ready()
        limit, vocab = info["max_model_len"], info["vocab_size"]
        if not ids:
            raise APIError(400, "the prompt is empty: give at least one token", param=param)
        if len(ids) >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your prompt has "
                           f"{len(ids)} tokens, which leaves no room for output (at most {limit - 1} prompt "
                           "tokens). Please reduce the length of the prompt.", param=param,
                           code="context_length_exceeded")
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab][:5]
            raise APIError(400, f"the prompt has token ids outside the vocabulary [0, {vocab}): {bad}", param=param)

    def _max_tokens(self, ids: list[int], requested: int | None, param: str, prompt_param: str,
                    clamp: bool = False) -> int:
        limit = self._require_ready()["max_model_len"]
        room = limit - len(ids)
        if requested is None:
            return room
        if requested < 1:
            raise APIError(400, f"{param} must be at least 1, got {requested}", param=param)
        if requested > room:
            if clamp:
                return room
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                           f"{len(ids) + requested} tokens ({len(ids)} in the {prompt_param}, {requested} in the "
                           f"completion). Please reduce the length of the {prompt_param} or {param}.",
                           param=param, code="context_length_exceeded")
        return requested

    def _validate(self, params: SamplingParams, names: dict[str, str]) -> None:
        info = self._require_ready()
        try:
            params.validate(info["vocab_size"], self.cfg.max_logprobs)
        except ValueError as exc:
            field = str(exc).split(" ", 1)[0]
            raise APIError(400, str(exc), param=names.get(field, field)) from None

    def _n(self, n: int) -> int:
        if not 1 <= n <= self.cfg.max_n:
            raise APIError(400, f"n must be between 1 and {self.cfg.max_n}, got {n}", param="n")
        return n

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        if req.tools:
            raise APIError(400, "tools are not supported by this server", param="tools")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise APIError(400, "response_format other than text is not supported", param="response_format")
        messages = []
        for m in req.messages:
            msg = {"role": m.role, "content": m.text()}
            if m.name:
                msg["name"] = m.name
            messages.append(msg)
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False,
                add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
                continue_final_message=req.continue_final_message, **(req.chat_template_kwargs or {}))
        except Exception as exc:  # jinja errors, missing template
            raise APIError(400, f"could not apply the chat template: {exc}", param="messages") from None
        return self._encode(text, add_special_tokens=False)

    def _fan_out(self, base_id: str, ids: list[int], params: SamplingParams, n: int, t0: float,
                 names: dict[str, str]) -> list[EngineRequest]:
        reqs = []
        for i in range(n):
            p = params
            if n > 1 and params.seed is not None and i:
                p = SamplingParams(**{**params.__dict__, "seed": params.seed + i})
            reqs.append(EngineRequest(self, f"{base_id}-{i}" if n > 1 else base_id, ids, p, t0, names))
        return reqs

    # ---- /v1/chat/completions ----------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest) -> Response:
        t0 = time.perf_counter()
        self._require_ready()
        self._check_model(req.model)
        n = self._n(req.n)
        ids = self._chat_prompt(req)
        self._check_prompt(ids, "messages")
        max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        names = {"max_tokens": max_param, "logprobs": "top_logprobs", "prompt": "messages"}
        max_tokens = self._max_tokens(ids, req.requested_max_tokens(), max_param, "messages")
        params = req.sampling_params(max_tokens, req.logprobs_k())
        self._validate(params, names)
        rid = new_id("chatcmpl")
        reqs = self._fan_out(rid, ids, params, n, t0, names)
        await start_all(reqs)
        created = now()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._stream_response(self._chat_events(rid, created, reqs, len(ids), include_usage,
                                                           params.logprobs))
        results = await asyncio.gather(*(r.collect() for r in reqs))
        choices = []
        for i, res in enumerate(results):
            choice = {"index": i, "message": {"role": "assistant", "content": res.text},
                      "logprobs": ({"content": chat_logprobs(res.logprobs, self.token_text, params.logprobs)}
                                   if params.logprobs is not None else None),
                      "finish_reason": res.finish_reason}
            if res.stop_reason is not None:
                choice["stop_reason"] = res.stop_reason
            choices.append(choice)
        usage = usage_dict(len(ids), sum(len(r.token_ids) for r in results),
                           min(len(ids), max(r.num_cached_tokens for r in results)))
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                             "choices": choices, "usage": usage})

    async def _chat_events(self, rid: str, created: int, reqs: list[EngineRequest], prompt_len: int,
                           include_usage: bool, top_n: int | None) -> AsyncIterator[str]:
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name}
        if include_usage:
            base["usage"] = None
        for i in range(len(reqs)):
            yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
        completion = [0] * len(reqs)
        cached = [0] * len(reqs)
        merged = merge(reqs)
        try:
            async for i, chunk in merged:
                completion[i] += len(chunk.token_ids)
                cached[i] = chunk.num_cached_tokens or cached[i]
                if not chunk.text and not chunk.finished and not chunk.logprobs:
                    continue
                choice = {"index": i, "delta": {"content": chunk.text} if chunk.text else {},
                          "logprobs": ({"content": chat_logprobs(chunk.logprobs or [], self.token_text, top_n)}
                                       if top_n is not None else None),
                          "finish_reason": chunk.finish_reason if chunk.finished else None}
                if chunk.finished and chunk.stop_reason is not None:
                    choice["stop_reason"] = chunk.stop_reason
                yield _sse({**base, "choices": [choice]})
        finally:
            await merged.aclose()
        if include_usage:
            yield _sse({**base, "choices": [], "usage": usage_dict(prompt_len, sum(completion),
                                                                   min(prompt_len, max(cached)))})
        yield SSE_DONE

    # ---- /v1/completions ---------------------------------------------------------------------
    async def completions(self, req: CompletionRequest) -> Response:
        t0 = time.perf_counter()
        self._require_ready()
        self._check_model(req.model)
        n = self._n(req.n)
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != n:
            raise APIError(400, "best_of other than n is not supported", param="best_of")
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo together with logprobs is not supported (no prompt logprobs)", param="echo")
        names = {"prompt": "prompt"}
        prompts = req.prompts()
        prepared = []
        for p in prompts:
            ids = self._encode(p, add_special_tokens=True) if isinstance(p, str) else list(p)
            self._check_prompt(ids, "prompt")
            max_tokens = self._max_tokens(ids, req.max_tokens, "max_tokens", "prompt")
            params = req.sampling_params(max_tokens, req.logprobs)
            self._validate(params, names)
            prepared.append((p, ids, params))
        rid = new_id("cmpl")
        reqs: list[EngineRequest] = []
        for k, (_, ids, params) in enumerate(prepared):
            reqs += self._fan_out(f"{rid}-{k}" if len(prepared) > 1 else rid, ids, params, n, t0, names)
        await start_all(reqs)
        created = now()
        echoes = [(p if isinstance(p, str) else self.tokenizer.decode(ids)) if req.echo else ""
                  for p, ids, _ in prepared]
        prompt_lens = [len(ids) for _, ids, _ in prepared]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._stream_response(self._completion_events(rid, created, reqs, n, prompt_lens, echoes,
                                                                 include_usage, req.logprobs))
        results = await asyncio.gather(*(r.collect() for r in reqs))
        choices = []
        for i, res in enumerate(results):
            echo = echoes[i // n]
            choice = {"index": i, "text": echo + res.text,
                      "logprobs": (completion_logprobs(res.logprobs, self.token_text, req.logprobs, len(echo))
                                   if req.logprobs is not None else None),
                      "finish_reason": res.finish_reason}
            if res.stop_reason is not None:
                choice["stop_reason"] = res.stop_reason
            choices.append(choice)
        cached = sum(min(prompt_lens[k], max(results[k * n + j].num_cached_tokens for j in range(n)))
                     for k in range(len(prompt_lens)))
        usage = usage_dict(sum(prompt_lens), sum(len(r.token_ids) for r in results), cached)
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                             "choices": choices, "usage": usage})

    async def _completion_events(self, rid: str, created: int, reqs: list[EngineRequest], n: int,
                                 prompt_lens: list[int], echoes: list[str], include_usage: bool,
                                 top_n: int | None) -> AsyncIterator[str]:
        base = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name}
        if include_usage:
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
                    lp = completion_logprobs(chunk.logprobs or [], self.token_text, top_n, offsets[i])
                    offsets[i] += len(chunk.text)
                choice = {"index": i, "text": text, "logprobs": lp,
                          "finish_reason": chunk.finish_reason if chunk.finished else None}
                if chunk.finished and chunk.stop_reason is not None:
                    choice["stop_reason"] = chunk.stop_reason
                yield _sse({**base, "choices": [choice]})
        finally:
            await merged.aclose()
        if include_usage:
            cached_total = sum(min(prompt_lens[k], max(cached[k * n:(k + 1) * n])) for k in range(len(prompt_lens)))
            yield _sse({**base, "choices": [], "usage": usage_dict(sum(prompt_lens), sum(completion), cached_total)})
        yield SSE_DONE

    # ---- /generate (SGLang) ------------------------------------------------------------------
    async def generate(self, req: GenerateRequest) -> Response:
        t0 = time.perf_counter()
        self._require_ready()
        batch, items = req.items()
        names = {"max_tokens": "sampling_params.max_new_tokens",
                 "prompt": "text" if req.text is not None else "input_ids"}
        names.update({f: f"sampling_params.{f}" for f in SAMPLING_FIELDS if f not in names})
        names["logprobs"] = "top_logprobs_num"
        prepared = []
        for prompt, sp, ret_lp, top, rid in items:
            ids = self._encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else list(prompt)
            self._check_prompt(ids, names["prompt"])
            max_new = self._max_tokens(ids, sp.max_new_tokens, "sampling_params.max_new_tokens", names["prompt"],
                                       clamp=True)
            if ret_lp and top < 0:
                raise APIError(400, f"top_logprobs_num must be >= 0, got {top}", param="top_logprobs_num")
            params = sp.to_engine(top if ret_lp else None)
            params.max_tokens = max_new
            self._validate(params, names)
            prepared.append((ids, params, ret_lp, top, rid, sp.max_new_tokens))
        reqs = [EngineRequest(self, rid or new_id("gen"), ids, params, t0, names)
                for ids, params, _, _, rid, _ in prepared]
        await start_all(reqs)
        if req.stream:
            return self._stream_response(self._generate_events(reqs, prepared, batch, t0, req.return_text_in_logprobs))
        results = await asyncio.gather(*(r.collect() for r in reqs))
        outs = [self._generate_result(r, res, prep, t0, req.return_text_in_logprobs)
                for r, res, prep in zip(reqs, results, prepared)]
        return JSONResponse(outs if batch else outs[0])

    def _generate_result(self, r: EngineRequest, res: Collected, prep, t0: float, lp_text: bool) -> dict[str, Any]:
        _, params, ret_lp, top, _, max_new = prep
        last = res.token_ids[-1] if res.token_ids else None
        meta = {
            "id": r.request_id,
            "finish_reason": sglang_finish_reason(res.finish_reason, res.stop_reason, params.max_tokens, last),
            "prompt_tokens": r.prompt_len,
            "completion_tokens": len(res.token_ids),
            "cached_tokens": res.num_cached_tokens,
            "e2e_latency": time.perf_counter() - t0,
            "weight_version": "default",
        }
        if ret_lp:
            text_of = self.token_text if lp_text else (lambda _tid: None)
            meta["input_token_logprobs"] = []
            meta["input_top_logprobs"] = []
            meta["output_token_logprobs"] = [[lp.logprob, lp.token_id, text_of(lp.token_id)] for lp in res.logprobs]
            meta["output_top_logprobs"] = ([[[v, tid, text_of(tid)] for tid, v in lp.top[:top]] for lp in res.logprobs]
                                           if top else [])
        return {"text": res.text, "output_ids": list(res.token_ids), "meta_info": meta}

    async def _generate_events(self, reqs: list[EngineRequest], prepared, batch: bool, t0: float,
                               lp_text: bool) -> AsyncIterator[str]:
        acc = [Collected() for _ in reqs]
        merged = merge(reqs)
        try:
            async for i, chunk in merged:
                acc[i].add(chunk)
                if not chunk.text and not chunk.finished and not chunk.logprobs:
                    continue
                out = self._generate_result(reqs[i], acc[i], prepared[i], t0, lp_text)
                if not chunk.finished:
                    out["meta_info"]["finish_reason"] = None
                if batch:
                    out["index"] = i
                yield _sse(out)
        finally:
            await merged.aclose()
        yield SSE_DONE

    # ---- plumbing ----------------------------------------------------------------------------
    def _stream_response(self, events: AsyncIterator[str]) -> StreamingResponse:
        metrics = self.metrics

        async def guarded() -> AsyncIterator[str]:
            metrics.http_in_flight += 1
            try:
                async for event in events:
                    yield event
            except APIError as exc:  # the engine failed mid-stream: tell the client, then end the stream
                metrics.error()
                yield _sse(exc.body())
                yield SSE_DONE
            finally:
                metrics.http_in_flight -= 1
                await events.aclose()

        return StreamingResponse(guarded(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _build_app(self) -> FastAPI:
        server = self

        @asynccontextmanager
        async def lifespan(_app: FastAPI):
            server.start()
            yield
            if server._ready_task is not None:
                server._ready_task.cancel()
            close = getattr(server.client, "close", None)
            if close is not None:
                await close()

        app = FastAPI(title="EdgeAcc-Ray", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

        def error_response(exc: APIError) -> JSONResponse:
            server.metrics.error()
            return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

        @app.exception_handler(APIError)
        async def _api_error(_request: Request, exc: APIError):
            return error_response(exc)

        @app.exception_handler(RequestValidationError)
        async def _invalid(_request: Request, exc: RequestValidationError):
            errors = exc.errors()
            first = errors[0] if errors else {}
            if first.get("type") == "json_invalid":
                ctx = first.get("ctx", {}) or {}
                return error_response(APIError(400, f"malformed JSON body: {ctx.get('error', 'invalid JSON')}",
                                               code="invalid_json"))
            parts, param = [], None
            for err in errors:
                loc = [str(p) for p in err.get("loc", ()) if p != "body"]
                name = ".".join(loc) or "body"
                param = param or (name if loc else None)
                parts.append(f"{name}: {err.get('msg')}")
            return error_response(APIError(400, "invalid request: " + "; ".join(parts), param=param))

        @app.exception_handler(StarletteHTTPException)
        async def _http_error(_request: Request, exc: StarletteHTTPException):
            code = {413: "request_too_large", 404: "not_found"}.get(exc.status_code, exc.status_code)
            return error_response(APIError(exc.status_code, str(exc.detail), code=code,
                                           type="invalid_request_error" if exc.status_code < 500 else "server_error"))

        @app.exception_handler(Exception)
        async def _unexpected(_request: Request, exc: Exception):
            logger.exception("unhandled error")
            return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                                           type="internal_server_error", code="internal_error"))

        @app.post("/v1/chat/completions")
        async def chat(req: ChatCompletionRequest):
            return await server.chat(req)

        @app.post("/v1/completions")
        async def completions(req: CompletionRequest):
            return await server.completions(req)

        @app.post("/generate")
        async def generate(req: GenerateRequest):
            return await server.generate(req)

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [server._model_card()]}

        @app.get("/v1/models/{model_id:path}")
        async def model(model_id: str):
            server._check_model(model_id)
            return server._model_card()

        @app.get("/health")
        async def health():
            server._require_ready()
            return Response(status_code=200)

        @app.get("/health_generate")
        async def health_generate():
            server._require_ready()
            ids = server._encode("ping", add_special_tokens=True) or [0]
            req = EngineRequest(server, new_id("health"), ids, SamplingParams(max_tokens=1, temperature=0.0),
                                 time.perf_counter(), {})
            try:
                await asyncio.wait_for(_run_to_end(req), timeout=30)
            except (asyncio.TimeoutError, APIError) as exc:
                raise APIError(503, f"the engine did not generate: {exc}", type="service_unavailable",
                               code="unhealthy") from None
            return Response(status_code=200)

        @app.get("/get_model_info")
        async def get_model_info():
            info = server._require_ready()
            return {"model_path": info.get("model_path"), "tokenizer_path": server.tokenizer_path,
                    "is_generation": True, "preferred_sampling_params": None, "weight_version": "default",
                    "has_image_understanding": False, "has_audio_understanding": False,
                    "served_model_name": server.model_name, "max_model_len": info.get("max_model_len"),
                    "model_info": info}

        @app.get("/get_server_info")
        async def get_server_info():
            info = server._require_ready()
            stats = await server._stats()
            internal = {}
            if stats is not None:
                internal = {"num_running_reqs": stats.num_running, "num_queue_reqs": stats.num_waiting,
                            "token_usage": min(max(stats.kv_usage, 0.0), 1.0), "cache_hit_rate": stats.cache_hit_rate,
                            "num_free_pages": stats.num_free_pages, "num_total_pages": stats.num_total_pages,
                            "num_cached_pages": stats.num_cached_pages,
                            "requests_finished_total": stats.requests_finished_total,
                            "requests_aborted_total": stats.requests_aborted_total,
                            "num_prefilling_reqs": stats.num_prefilling,
                            "semi_pd_split": dataclasses.asdict(stats.split) if stats.split is not None else None}
            import edgeacc_ray

            return {**server.cfg.public_dict(), "served_model_name": server.model_name, "model_info": info,
                    "internal_states": [internal], "version": getattr(edgeacc_ray, "__version__", "0.1.0"),
                    "mode": server.cfg.pd_mode}

        @app.api_route("/flush_cache", methods=["GET", "POST"])
        async def flush_cache():
            server._require_ready()
            try:
                ok = await server.client.flush_cache()
            except Exception as exc:
                raise APIError(503, f"could not reach the engine: {exc}", type="service_unavailable") from None
            if not ok:
                return PlainTextResponse("Cache not flushed: the engine refused (requests in flight).",
                                         status_code=400)
            return PlainTextResponse("Cache flushed.\n", status_code=200)

        @app.get("/metrics")
        async def metrics():
            stats = await server._stats()
            return PlainTextResponse(server.metrics.render(stats),
                                     media_type="text/plain; version=0.0.4; charset=utf-8")

        app.add_middleware(ApiGuard, api_key=self.cfg.api_key, max_body=self.cfg.max_request_body_bytes,
                           on_error=self.metrics.error)
        return app

    async def _stats(self):
        if self.info is None:
            return None
        try:
            return await asyncio.wait_for(self.client.stats(), timeout=5)
        except Exception:
            return None

    def _model_card(self) -> dict[str, Any]:
        info = self.info or {}
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "edgeacc-ray",
                "root": info.get("model_path", self.cfg.model), "parent": None,
                "max_model_len": info.get("max_model_len")}


async def _run_to_end(req: EngineRequest) -> None:
    await req.start()
    await req.collect()
