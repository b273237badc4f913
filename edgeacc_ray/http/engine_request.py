"""One engine request as the HTTP layer sees it, and running several together (`n`, batches).

The first chunk is fetched before any response header is sent, so a refused request is a clean
4xx/5xx instead of a broken stream. Closing a request (its client went away) aborts it in the engine.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Mapping

from edgeacc_ray.engine.request import RequestOutput, SamplingParams, merge_outputs
from edgeacc_ray.http.engine_interface import EngineClient
from edgeacc_ray.http.errors import APIError, from_engine_error


class EngineRequest:
    """One engine request: started (first chunk fetched), then iterated; errors become APIError."""

    def __init__(
        self,
        client: EngineClient,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        param_names: Mapping[str, str],
    ) -> None:
        self.request_id, self.params, self.prompt_len = request_id, params, len(prompt_ids)
        self.param_names = param_names
        self._chunks = client.generate(request_id, prompt_ids, params)
        self._first: RequestOutput | None = None
        self._done = False

    async def start(self) -> None:
        try:
            self._first = await self._chunks.__anext__()
            self._done = self._first.finished
        except StopAsyncIteration:
            self._done = True
        except Exception as exc:
            self._done = True
            raise from_engine_error(exc, self.request_id, self.param_names) from None

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            if self._first is not None:
                first, self._first = self._first, None
                yield first
            if self._done:
                return
            async for chunk in self._chunks:
                self._done = chunk.finished
                yield chunk
        except (GeneratorExit, asyncio.CancelledError, APIError):
            raise
        except Exception as exc:
            raise from_engine_error(exc, self.request_id, self.param_names) from None
        finally:
            await self.close()

    async def close(self) -> None:
        """Abort the request if it is still running (a no-op once it finished)."""
        await self._chunks.aclose()

    async def collect(self) -> RequestOutput:
        """The whole output: every chunk merged."""
        out = None
        async for chunk in self:
            out = merge_outputs(out, chunk)
        return out if out is not None else RequestOutput(self.request_id, [], "")


async def start_all(requests: list[EngineRequest]) -> None:
    """Start every engine request; if one is refused, close them all and raise its error."""
    results = await asyncio.gather(*(r.start() for r in requests), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        await close_all(requests)
        raise errors[0]


async def collect_all(requests: list[EngineRequest]) -> list[RequestOutput]:
    """Run every request to the end; when one fails (or the caller is cancelled), stop the others."""
    tasks = [asyncio.ensure_future(r.collect()) for r in requests]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()  # finished tasks ignore it; running ones abort their engine request
        await asyncio.gather(*tasks, return_exceptions=True)


async def close_all(requests: list[EngineRequest]) -> None:
    await asyncio.gather(*(r.close() for r in requests), return_exceptions=True)


async def merge(requests: list[EngineRequest]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' chunks as they come, as (index, chunk); leaving early closes all."""
    if len(requests) == 1:
        try:
            async for chunk in requests[0]:
                yield 0, chunk
        finally:
            await requests[0].close()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, r: EngineRequest) -> None:
        try:
            async for chunk in r:
                await queue.put((i, chunk, None))
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, None, exc))
            return
        await queue.put((i, None, None))

    tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(requests)]
    live = len(tasks)
    try:
        while live:
            i, chunk, exc = await queue.get()
            if chunk is None:
                live -= 1
                if exc is not None and not isinstance(exc, asyncio.CancelledError):
                    raise exc
                continue
            yield i, chunk
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all(requests)
