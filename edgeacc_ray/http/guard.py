"""ASGI middleware in front of the HTTP API: the API key (`Authorization: Bearer`) and a limit on the
request body size, both answered with OpenAI-style errors before any route runs."""

from __future__ import annotations

from fastapi import HTTPException

from edgeacc_ray.http.errors import send_error

AUTH_EXEMPT = (
    "/health",
    "/metrics",
    "/openapi.json",
    "/docs",
)  # SGLang's, plus the public API schema


class ApiGuard:
    """Raw ASGI middleware: API key (`Authorization: Bearer`) and request body size limit."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(
            root
        ):  # under a route prefix the path includes it (ASGI root_path)
            path = path[len(root) :]
        if (
            self.api_key is not None
            and scope.get("method") != "OPTIONS"
            and not path.startswith(AUTH_EXEMPT)
        ):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if not auth:
                return await send_error(
                    send,
                    401,
                    "missing API key: send `Authorization: Bearer <key>`",
                    "invalid_request_error",
                    "invalid_api_key",
                    [(b"www-authenticate", b"Bearer")],
                )
            if scheme.lower() != "bearer" or token.strip() != self.api_key:
                return await send_error(
                    send,
                    401,
                    "incorrect API key",
                    "invalid_request_error",
                    "invalid_api_key",
                    [(b"www-authenticate", b"Bearer")],
                )
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await send_error(
                send,
                413,
                f"request body of {int(length)} bytes exceeds the limit of "
                f"{self.max_body} bytes (max_request_body_bytes)",
                "invalid_request_error",
                "request_too_large",
            )
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if (
                    received > self.max_body
                ):  # an HTTPException: FastAPI re-raises those from body parsing
                    raise HTTPException(
                        413,
                        f"request body exceeds the limit of {self.max_body} bytes "
                        "(max_request_body_bytes)",
                    )
            return message

        return await self.app(scope, limited_receive, send)
