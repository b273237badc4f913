"""How the Ingress talks to the engine side (an `EngineServer` or a Semi-PD `DecodeServer`) through
its DeploymentHandle; implements `edgeacc_ray.http.engine_interface.EngineClient`.

Output travels one of two ways (`engine_stream_mode`):
- "multiplexed" (default): this client holds one long-lived stream from the engine (`subscribe`) that
  carries the chunks of all of its requests in batches, and starts each request with a short
  `submit` call. Ray items then scale with engine steps, not with requests x chunks.
- "per_request": one streaming handle call per request (`generate`).
Either way, closing a request's iterator early aborts it in the engine (aborts are sent in batches,
one call per event-loop turn), and the engine aborts everything of a client whose keepalive stops
(its Ingress died). Errors arrive as the engine's typed exceptions.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import uuid
from typing import Any, AsyncIterator, Callable

from ray.serve.handle import DeploymentHandle

from deployments.engine_service import KEEPALIVE_INTERVAL_S
from edgeacc_ray.engine.errors import EngineOverloaded, EngineUnavailable, InvalidRequest
from edgeacc_ray.engine.outputs import EngineStats, RequestOutput
from edgeacc_ray.engine.sampling_params import SamplingParams

__all__ = ["EngineClient", "InvalidRequest", "EngineUnavailable"]

logger = logging.getLogger("ray.serve")

ENGINE_GONE = "the engine process stopped; it is restarting"  # what clients are told, nothing internal


def _unavailable(exc: BaseException) -> bool:
    from ray import exceptions as ray_exc
    from ray.serve import exceptions as serve_exc

    kinds = (ray_exc.RayActorError, ray_exc.ActorUnavailableError, serve_exc.DeploymentUnavailableError)
    return isinstance(exc, kinds) or isinstance(getattr(exc, "cause", None), kinds)


def _backpressure(exc: BaseException) -> bool:
    from ray.serve.exceptions import BackPressureError

    return isinstance(exc, BackPressureError) or isinstance(getattr(exc, "cause", None), BackPressureError)


def _detached(coro) -> asyncio.Task:
    """A task outside the current request's context: Ray Serve cancels the handle calls a request
    makes when that request is cancelled, and the shared stream or an abort must outlive it."""
    return asyncio.get_running_loop().create_task(coro, context=contextvars.Context())


class EngineClient:
    """The engine side seen from the Ingress."""

    def __init__(self, engine: DeploymentHandle, stream_mode: str = "multiplexed"):
        if stream_mode not in ("multiplexed", "per_request"):
            raise ValueError(f"stream_mode must be 'multiplexed' or 'per_request', got {stream_mode!r}")
        self._handle = engine
        self._stream = engine.options(stream=True)
        self.stream_mode = stream_mode
        self._caller_id = f"ingress-{uuid.uuid4().hex}"
        self._queues: dict[str, asyncio.Queue] = {}
        self._listener: asyncio.Task | None = None
        self._keepalive: asyncio.Task | None = None
        self._aborts: list[str] = []
        self._abort_flush: asyncio.Task | None = None
        self._on_unavailable: list[Callable[[], None]] = []

    # ---- lifecycle and health ----
    def on_unavailable(self, callback: Callable[[], None]) -> None:
        self._on_unavailable.append(callback)

    def _lost(self, exc: BaseException) -> None:
        logger.warning("engine side unavailable: %s: %s", type(exc).__name__, exc)
        for callback in self._on_unavailable:
            callback()

    async def start(self) -> None:
        """Open the shared stream (multiplexed) and start renewing this client's lease."""
        if self.stream_mode == "multiplexed" and (self._listener is None or self._listener.done()):
            self._listener = _detached(self._listen())
        if self._keepalive is None or self._keepalive.done():
            self._keepalive = _detached(self._renew_lease())

    async def close(self) -> None:
        """Drop the shared stream and the lease (the engine aborts this client's requests)."""
        tasks = [t for t in (self._listener, self._keepalive) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _renew_lease(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._handle.keepalive.remote(self._caller_id), timeout=10)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the engine is down: the health probe notices; keep trying
                logger.debug("keepalive failed: %s", type(exc).__name__)
            await asyncio.sleep(KEEPALIVE_INTERVAL_S)

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self._handle, method).remote(*args)
        except Exception as exc:
            if _backpressure(exc):  # Ray Serve's own queue bound: an overload answer (429), not an outage
                raise EngineOverloaded("the server is busy; retry shortly", retry_after_s=1) from None
            if _unavailable(exc):
                self._lost(exc)
                raise EngineUnavailable(ENGINE_GONE) from None
            raise

    # ---- plain calls ----
    async def model_info(self) -> dict[str, Any]:
        return await getattr(self._handle, "model_info").remote()

    async def stats(self) -> EngineStats:
        return await self._call("stats")

    async def flush_cache(self) -> None:
        await self._call("flush_cache")

    # ---- aborts, batched ----
    def _abort_later(self, request_id: str) -> None:
        self._aborts.append(request_id)
        if self._abort_flush is None or self._abort_flush.done():
            self._abort_flush = _detached(self._flush_aborts())

    async def _flush_aborts(self) -> None:
        await asyncio.sleep(0)  # let the other choices of the same HTTP request queue theirs
        while self._aborts:
            batch, self._aborts = self._aborts, []
            try:
                await asyncio.wait_for(self._handle.abort.remote(self._caller_id, batch), timeout=30)
            except Exception as exc:  # the engine is gone: nothing left to abort
                logger.info("abort of %d requests failed: %s", len(batch), type(exc).__name__)

    # ---- generation ----
    def generate(self, request_id: str, prompt_token_ids: list[int],
                 params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Chunks of one request. Closing this iterator early (or cancelling the task iterating it)
        aborts the request in the engine, which frees its pages."""
        if self.stream_mode == "per_request":
            return self._generate_per_request(request_id, prompt_token_ids, params)
        return self._generate_multiplexed(request_id, prompt_token_ids, params)

    async def _generate_per_request(self, request_id: str, prompt_token_ids: list[int],
                                    params: SamplingParams) -> AsyncIterator[RequestOutput]:
        await self.start()
        response = self._stream.generate.remote(self._caller_id, request_id, prompt_token_ids, params)
        finished = False
        try:
            async for item in response:
                if isinstance(item, Exception):  # refused or failed: the last item
                    finished = True
                    raise item
                finished = item.finished
                yield item
        except (InvalidRequest, EngineUnavailable, GeneratorExit, asyncio.CancelledError):
            raise
        except Exception as exc:
            if _unavailable(exc):
                self._lost(exc)
                raise EngineUnavailable(ENGINE_GONE) from None
            raise
        finally:
            if not finished:
                response.cancel()

    async def _listen(self) -> None:
        response = self._stream.subscribe.remote(self._caller_id)
        lost: BaseException = EngineUnavailable("the engine's output stream ended")
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
            lost = exc
        self._lost(lost)
        for queue in list(self._queues.values()):
            queue.put_nowait(EngineUnavailable(ENGINE_GONE))

    async def _generate_multiplexed(self, request_id: str, prompt_token_ids: list[int],
                                    params: SamplingParams) -> AsyncIterator[RequestOutput]:
        if request_id in self._queues:
            raise InvalidRequest("request_id", f"request id {request_id!r} is already running")
        await self.start()
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        finished = False
        try:
            await self._call("submit", self._caller_id, request_id, prompt_token_ids, params)
            while not finished:
                item = await queue.get()
                if isinstance(item, Exception):  # refused or failed: nothing more comes
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:  # the caller left early (or submit failed): harmless if it never started
                self._abort_later(request_id)
