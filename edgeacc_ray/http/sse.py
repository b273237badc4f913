"""Server-sent events: framing, and a streaming response that ends with a clean error event (then
[DONE]) when the engine fails mid-stream, and closes the engine requests when the client leaves."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from edgeacc_ray.http.errors import APIError

SSE_DONE = "data: [DONE]\n\n"


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse(obj: Any) -> str:
    return "data: " + dumps(obj) + "\n\n"


def stream_response(
    events: AsyncIterator[str], on_open: Callable[[], None], on_close: Callable[[], None]
) -> StreamingResponse:
    async def guarded() -> AsyncIterator[str]:
        on_open()
        try:
            async for event in events:
                yield event
        except APIError as exc:
            yield sse(exc.body())
            yield SSE_DONE
        finally:
            on_close()
            await events.aclose()

    return StreamingResponse(
        guarded(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
