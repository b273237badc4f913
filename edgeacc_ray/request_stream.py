"""One engine request as the HTTP layer sees it, and helpers to run several (`n`, batches) together."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, AsyncIterator

from edgeacc_ray.engine.outputs import RequestOutput
from edgeacc_ray.engine.sampling_params import SamplingParams
from edgeacc_ray.protocol import APIError, EngineRequestError, EngineUnavailable

if TYPE_CHECKING:
    from edgeacc_ray.api_server import ApiServer

logger = logging.getLogger("ray.serve")

SAMPLING_FIELDS = {"max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "logprobs", "stop", "stop_token_ids"}


class Collected:
    """A finished choice, accumulated from chunks."""

    __slots__ = ("text", "token_ids", "logprobs", "finish_reason", "stop_reason", "num_prompt_tokens",
                 "num_cached_tokens")

    def __init__(self):
        self.text, self.token_ids, self.logprobs = "", [], []
        self.finish_reason = self.stop_reason = None
        self.num_prompt_tokens = self.num_cached_tokens = 0

    def add(self, chunk: RequestOutput) -> None:
        self.text += chunk.text
        self.token_ids.extend(chunk.token_ids)
        if chunk.logprobs:
            self.logprobs.extend(chunk.logprobs)
        self.num_prompt_tokens = chunk.num_prompt_tokens or self.num_prompt_tokens
        self.num_cached_tokens = chunk.num_cached_tokens or self.num_cached_tokens
        if chunk.finished:
            self.finish_reason, self.stop_reason = chunk.finish_reason, chunk.stop_reason


class EngineRequest:
    """One engine request as the HTTP layer sees it: the first chunk fetched up front (so bad input
    is a 400 before any response header), then the rest; latency metrics recorded on the way."""

    def __init__(self, server: "ApiServer", request_id: str, prompt_ids: list[int], params: SamplingParams,
                 t0: float, param_names: dict[str, str]):
        self.server, self.request_id, self.params, self.t0 = server, request_id, params, t0
        self.prompt_len = len(prompt_ids)
        self.param_names = param_names
        self._chunks = server.client.generate(request_id, prompt_ids, params)
        self._first: RequestOutput | None = None
        self._done = False
        self._ttft: float | None = None
        self._last = t0
        self._num_out = 0
        self._recorded = False

    def _observe(self, chunk: RequestOutput) -> None:
        k = len(chunk.token_ids)
        t = time.perf_counter()
        if k:
            m = self.server.metrics
            if self._ttft is None:
                self._ttft = t - self.t0
                m.first_token(self._ttft)
                if k > 1:
                    m.tokens(0.0, k - 1)
            else:
                m.tokens(t - self._last, k)
            self._last = t
            self._num_out += k
        if chunk.finished:
            self._done = True
            self._record(aborted=chunk.finish_reason == "abort")

    def _record(self, aborted: bool) -> None:
        if not self._recorded:
            self._recorded = True
            self.server.metrics.finished(time.perf_counter() - self.t0, self._ttft, self._num_out, aborted)

    def _translate(self, exc: Exception) -> APIError:
        if isinstance(exc, EngineRequestError):
            msg = str(exc)
            field = msg.split(" ", 1)[0]
            param = self.param_names.get(field, field) if field in SAMPLING_FIELDS else self.param_names.get("prompt")
            return APIError(400, msg, param=param)
        if isinstance(exc, EngineUnavailable):
            return APIError(503, f"the engine is unavailable, retry shortly ({exc})", type="service_unavailable",
                            code="engine_unavailable", headers={"Retry-After": "1"})
        logger.exception("engine request %s failed", self.request_id)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="internal_server_error",
                        code="internal_error")

    async def start(self) -> None:
        try:
            self._first = await self._chunks.__anext__()
            self._observe(self._first)
        except StopAsyncIteration:
            self._done = True
        except Exception as exc:
            self._done = True
            self._record(aborted=True)
            raise self._translate(exc) from None

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            if self._first is not None:
                first, self._first = self._first, None
                yield first
            if self._done:
                return
            async for chunk in self._chunks:
                self._observe(chunk)
                yield chunk
        except (GeneratorExit, asyncio.CancelledError):
            raise
        except APIError:
            raise
        except Exception as exc:
            raise self._translate(exc) from None
        finally:
            if not self._done:
                self._record(aborted=True)
                await self._chunks.aclose()

    async def close(self) -> None:
        if not self._done:
            self._record(aborted=True)
            await self._chunks.aclose()

    async def collect(self) -> Collected:
        out = Collected()
        async for chunk in self:
            out.add(chunk)
        return out


async def start_all(requests: list[EngineRequest]) -> None:
    """Start every engine request; if one is refused, close the others and raise its error."""
    results = await asyncio.gather(*(r.start() for r in requests), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        await asyncio.gather(*(r.close() for r in requests), return_exceptions=True)
        raise errors[0]


async def merge(requests: list[EngineRequest]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' chunks as they come; (index, chunk)."""
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
        await asyncio.gather(*(r.close() for r in requests), return_exceptions=True)
