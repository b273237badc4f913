"""Errors as clients see them: OpenAI's shape `{"error": {"message", "type", "param", "code"}}`,
short and stable messages, never internal identifiers (those go to the logs with the request id)."""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping

from edgeacc_ray.engine.request import EngineOverloaded, EngineUnavailable, InvalidRequest

logger = logging.getLogger("ray.serve")

RETRY_AFTER_S = 1


class APIError(Exception):
    """An error answered with `status` and an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param
        self.code = code if code is not None else status
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | int | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


async def send_error(
    send, status: int, message: str, type_: str, code: str, headers: tuple = ()
) -> None:
    """Answer an ASGI request with an OpenAI-style error from middleware, before any route runs."""
    body = json.dumps(
        error_body(message, type_, None, code), ensure_ascii=False, separators=(",", ":")
    ).encode()
    head = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def unavailable(
    message: str, code: str = "engine_unavailable", retry_after_s: int | None = None
) -> APIError:
    return APIError(
        503,
        message,
        type="service_unavailable",
        code=code,
        headers={"Retry-After": str(retry_after_s or RETRY_AFTER_S)},
    )


def overloaded(message: str, retry_after_s: int | None, code: str | None = None) -> APIError:
    """429: come back after `retry_after_s` (the engine's estimate from its measured drain rate)."""
    return APIError(
        429,
        message,
        type="rate_limit_exceeded",
        code=code or "overloaded",
        headers={"Retry-After": str(retry_after_s or RETRY_AFTER_S)},
    )


def from_engine_error(
    exc: BaseException, request_id: str, param_names: Mapping[str, str]
) -> APIError:
    """The API error for what the engine side raised; `param_names` maps the engine's field names
    to this endpoint's parameter names."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequest):
        return APIError(400, str(exc), param=param_names.get(exc.field, exc.field), code=exc.code)
    if isinstance(exc, EngineOverloaded):
        return overloaded(str(exc), exc.retry_after_s, exc.code)
    if isinstance(exc, EngineUnavailable):
        logger.warning("request %s: engine unavailable: %s", request_id, exc)
        return unavailable(str(exc), exc.code or "engine_unavailable", exc.retry_after_s)
    logger.error("request %s failed", request_id, exc_info=exc)
    return APIError(
        500,
        f"internal error; the server log has the details (request id {request_id})",
        type="internal_server_error",
        code="internal_error",
    )
