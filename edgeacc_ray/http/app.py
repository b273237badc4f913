"""`build_api(config, client, tokenizer_path)`: the FastAPI app the Serve Ingress exposes, over any
engine client. Routes are in `routes/`; here are the error handlers (every error is OpenAI-shaped,
every 5xx is logged with a stable client message), the OpenAPI schema and the API guard."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import edgeacc_ray
from edgeacc_ray.config import ServeConfig
from edgeacc_ray.http.context import ApiContext
from edgeacc_ray.http.engine_interface import EngineClient
from edgeacc_ray.http.errors import APIError
from edgeacc_ray.http.guard import ApiGuard
from edgeacc_ray.http.inflight import InFlight, InFlightCount
from edgeacc_ray.http.routes import admin, chat, completions, generate

logger = logging.getLogger("ray.serve")

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def build_api(config: ServeConfig, client: EngineClient, tokenizer_path: str) -> FastAPI:
    ctx = ApiContext(config, client, tokenizer_path)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        ctx.health.start()
        yield
        await ctx.health.stop()
        await client.close()

    app = FastAPI(
        title="EdgeAcc-Ray",
        version=edgeacc_ray.__version__,
        lifespan=lifespan,
        description="OpenAI-compatible and SGLang-native LLM serving on Ray Serve.",
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.ctx = ctx

    def error_response(exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            ctx_info = first.get("ctx", {}) or {}
            return error_response(
                APIError(
                    400,
                    f"malformed JSON body: {ctx_info.get('error', 'invalid JSON')}",
                    code="invalid_json",
                )
            )
        parts, param = [], None
        for err in errors[:5]:
            loc = [str(p) for p in err.get("loc", ()) if p != "body"]
            name = ".".join(loc) or "body"
            param = param or (name if loc else None)
            parts.append(f"{name}: {str(err.get('msg')).removeprefix('Value error, ')}")
        return error_response(APIError(400, "invalid request: " + "; ".join(parts), param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        status = exc.status_code
        return error_response(
            APIError(
                status,
                str(exc.detail),
                code=_HTTP_CODES.get(status, status),
                type="invalid_request_error" if status < 500 else "server_error",
                headers=dict(exc.headers or {}),
            )
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(
            APIError(
                500,
                "internal error; the server log has the details",
                type="internal_server_error",
                code="internal_error",
            )
        )

    for module in (chat, completions, generate, admin):
        app.include_router(module.router(ctx))
    app.add_middleware(ApiGuard, api_key=config.api_key, max_body=config.max_request_body_bytes)
    app.state.in_flight = InFlightCount(http_limit(config))
    app.add_middleware(InFlight, count=app.state.in_flight)  # outermost: a refusal costs least
    return app


def http_limit(config: ServeConfig) -> int | None:
    """Requests one replica takes before answering 429 when it serves HTTP itself: what Serve would
    have let reach it (`ingress_max_ongoing_requests`) plus what its proxy would have held
    (`ingress_max_queued_requests`). Behind Serve's proxy, the proxy bounds it."""
    if config.http_server == "proxy" or config.ingress_max_queued_requests < 0:
        return None
    return config.ingress_max_ongoing_requests + config.ingress_max_queued_requests
