"""How the Ingress talks to the engine side, whatever its layout.

Today the engine side is one colocated `EngineServer` deployment; later it is Prefill/Decode servers
behind an Admission deployment. The Ingress only ever sees this class: `model_info()`, `generate()`
(an async iterator of `RequestOutput` chunks), `stats()`, `flush_cache()`.

Output travels one of two ways (`engine_stream_mode`):
- "multiplexed" (default): this client holds one long-lived stream from the engine (`subscribe`) that
  carries the chunks of all of its requests in batches, and starts each request with a short
  `submit` call. Ray items then scale with engine steps, not with requests x chunks.
- "per_request": one streaming handle call per request (`generate`).
Either way, closing a request's iterator early aborts it in the engine and frees its KV pages.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import uuid
from typing import Any, AsyncIterator

from ray.serve.handle import DeploymentHandle

from edgeacc_ray.engine.outputs import EngineStats, RequestOutput
from edgeacc_ray.engine.sampling_params import SamplingParams
from edgeacc_ray.protocol import EngineRequestError, EngineUnavailable

__all__ = ["EngineClient", "EngineRequestError", "EngineUnavailable"]

logger = logging.getLogger("ray.serve")


def _unavailable(exc: BaseException) -> bool:
    from ray import exceptions as ray_exc
    from ray.serve import exceptions as serve_exc

    kinds = (ray_exc.RayActorError, ray_exc.ActorUnavailableError, serve_exc.DeploymentUnavailableError,
             serve_exc.BackPressureError)
    return isinstance(exc, kinds) or isinstance(getattr(exc, "cause", None), kinds)


def _detached(coro) -> asyncio.Task:
    """A task outside the current request's context: Ray Serve cancels the handle calls a request
    makes when that request is cancelled, and the shared stream or an abort must outlive it."""
    return asyncio.get_running_loop().create_task(coro, context=contextvars.Context())


class _Lost:
    """Put into every waiting request's queue when the multiplexed stream breaks."""

    def __init__(self, reason: str):
        self.reason = reason


class EngineClient:
    """The engine side seen from the Ingress; wraps the DeploymentHandle of a colocated EngineServer."""

    def __init__(self, engine: DeploymentHandle, stream_mode: str = "multiplexed"):
        if stream_mode not in ("multiplexed", "per_request"):
            raise ValueError(f"stream_mode must be 'multiplexed' or 'per_request', got {stream_mode!r}")
        self._handle = engine
        self._stream = engine.options(stream=True)
        self.stream_mode = stream_mode
        self._subscriber_id = f"ingress-{uuid.uuid4().hex}"
        self._queues: dict[str, asyncio.Queue] = {}
        self._listener: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self._handle, method).remote(*args)
        except Exception as exc:
            if _unavailable(exc):
                raise EngineUnavailable(f"engine unavailable: {type(exc).__name__}") from exc
            raise

    async def close(self) -> None:
        """Drop the shared output stream (its requests are aborted by the engine)."""
        if self._listener is not None and not self._listener.done():
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)

    async def model_info(self) -> dict[str, Any]:
        return await self._call("model_info")

    async def stats(self) -> EngineStats:
        return await self._call("stats")

    async def flush_cache(self) -> bool:
        return await self._call("flush_cache")

    def generate(self, request_id: str, prompt_token_ids: list[int],
                 params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Chunks of one request. Closing this iterator early (or cancelling the task iterating it)
        aborts the request in the engine, which frees its pages."""
        if self.stream_mode == "per_request":
            return self._generate_per_request(request_id, prompt_token_ids, params)
        return self._generate_multiplexed(request_id, prompt_token_ids, params)

    # ---- one streaming call per request ----
    async def _generate_per_request(self, request_id: str, prompt_token_ids: list[int],
                                    params: SamplingParams) -> AsyncIterator[RequestOutput]:
        response = self._stream.generate.remote(request_id, prompt_token_ids, params)
        finished = False
        try:
            async for item in response:
                if isinstance(item, dict):  # {"error": message}: refused before the first chunk
                    finished = True
                    raise EngineRequestError(item["error"])
                if item.finished:
                    finished = True
                yield item
        except (EngineRequestError, GeneratorExit):
            raise
        except Exception as exc:
            if _unavailable(exc):
                logger.warning("engine stream failed: %s: %s", type(exc).__name__, exc)
                raise EngineUnavailable("the engine process stopped; it is restarting, retry the request") from exc
            raise
        finally:
            if not finished:
                response.cancel()

    # ---- many requests over one stream ----
    def _ensure_listener(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = _detached(self._listen())

    async def _listen(self) -> None:
        response = self._stream.subscribe.remote(self._subscriber_id)
        reason = "the engine's output stream ended"
        try:
            async for batch in response:
                for request_id, item in batch:
                    queue = self._queues.get(request_id)
                    if queue is not None:
                        queue.put_nowait(item)
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as exc:  # the engine replica died or restarted
            logger.warning("lost the engine's output stream: %s: %s", type(exc).__name__, exc)
            reason = "the engine process stopped; it is restarting, retry the request"  # no Ray internals
        for queue in list(self._queues.values()):
            queue.put_nowait(_Lost(reason))

    def _in_background(self, coro) -> None:
        task = _detached(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort_quietly(self, request_id: str) -> None:
        try:
            await asyncio.wait_for(self._handle.abort.remote(self._subscriber_id, request_id), timeout=30)
        except Exception as exc:  # the engine is gone: nothing left to abort
            logger.info("abort of %s failed: %s", request_id, exc)

    async def _generate_multiplexed(self, request_id: str, prompt_token_ids: list[int],
                                    params: SamplingParams) -> AsyncIterator[RequestOutput]:
        if request_id in self._queues:
            raise EngineRequestError(f"request id {request_id!r} is already running")
        self._ensure_listener()
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        submitted = finished = False
        try:
            submitted = True  # from here on an early exit sends an abort (harmless if it never started)
            refused = await self._call("submit", self._subscriber_id, request_id, prompt_token_ids, params)
            if refused is not None:
                finished = True
                raise EngineRequestError(refused)
            while not finished:
                item = await queue.get()
                if isinstance(item, _Lost):
                    finished = True
                    raise EngineUnavailable(item.reason)
                if isinstance(item, dict):
                    finished = True
                    if item.get("kind") == "ValueError":
                        raise EngineRequestError(item["error"])
                    raise EngineUnavailable(f"the engine failed: {item['error']}")
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if submitted and not finished:
                self._in_background(self._abort_quietly(request_id))
