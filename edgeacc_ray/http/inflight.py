"""HTTP requests in flight in this process: counted for the Ingress autoscaler, and bounded where no
Serve proxy does it (`http_server: ingress`), with the same 429 + Retry-After the proxy sends."""

from __future__ import annotations

from edgeacc_ray.http.errors import send_error

FULL_RETRY_AFTER_S = 2  # what a refused client is told when every slot of the replica is taken
UNCOUNTED = ("/health", "/metrics")  # probes: always answered, never counted


class InFlightCount:
    """How many requests are in flight, and how many may be (None: no bound here, Serve's proxy
    bounds the replica). Read by the Ingress's autoscaling report (`app.state.in_flight`)."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.value = 0


class InFlight:
    """Raw ASGI middleware over `InFlightCount`."""

    def __init__(self, app, count: InFlightCount):
        self.app, self.count = app, count

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path", "").endswith(UNCOUNTED):
            return await self.app(scope, receive, send)
        count = self.count
        if count.limit is not None and count.value >= count.limit:
            return await send_error(
                send,
                429,
                f"the server is busy ({count.limit} HTTP requests in flight on this replica); "
                "retry shortly",
                "rate_limit_exceeded",
                "overloaded",
                ((b"retry-after", str(FULL_RETRY_AFTER_S).encode()),),
            )
        count.value += 1
        try:
            await self.app(scope, receive, send)
        finally:
            count.value -= 1
