"""How the Ingress talks to the engine side (an `EngineServer` or a Semi-PD `DecodeServer`) through
its DeploymentHandle; implements `edgeacc_ray.http.engine_interface.EngineClient`.

Output travels one of two ways (`engine_stream_mode`):
- "multiplexed" (default): a request starts with a short `submit` call, which `EngineRouter` places on
  a replica and which answers with that replica's id; this client holds one long-lived stream from
  each replica it uses (`subscribe`, pinned to it) that carries the chunks of all of its requests there
  in batches. Ray items then scale with engine steps, not with requests x chunks.
- "per_request": one streaming handle call per request (`generate`).
Either way, closing a request's iterator early aborts it in the engine (aborts are sent in batches,
one call per replica per event-loop turn), and a replica aborts everything of a client whose lease
renewals stop (its Ingress died). Errors arrive as the engine's typed exceptions.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import uuid
from typing import Any, AsyncIterator, Callable

from ray.serve.handle import DeploymentHandle

import deployments.replica_registry as registry
from deployments.engine_router import PIN_KWARG
from deployments.engine_service import KEEPALIVE_INTERVAL_S
from edgeacc_ray.engine.request import (
    EngineOverloaded,
    EngineStats,
    EngineUnavailable,
    InvalidRequest,
    RequestOutput,
    SamplingParams,
    combine_stats,
)

__all__ = ["ServeEngineClient", "InvalidRequest", "EngineUnavailable"]

logger = logging.getLogger("ray.serve")

ENGINE_GONE = (
    "the engine process stopped; it is restarting"  # what clients are told, nothing internal
)
SUBSCRIBE_TIMEOUT_S = 30.0


def _unavailable(exc: BaseException) -> bool:
    from ray import exceptions as ray_exc
    from ray.serve import exceptions as serve_exc

    kinds = (
        ray_exc.RayActorError,
        ray_exc.ActorUnavailableError,
        serve_exc.DeploymentUnavailableError,
    )
    return isinstance(exc, kinds) or isinstance(getattr(exc, "cause", None), kinds)


def _backpressure(exc: BaseException) -> bool:
    from ray.serve.exceptions import BackPressureError

    return isinstance(exc, BackPressureError) or isinstance(
        getattr(exc, "cause", None), BackPressureError
    )


def _own_call(method: Any, *args: Any, **kwargs: Any) -> Any:
    """`method.remote(...)` outside the current HTTP request's Serve context. Calls made inside a request
    inherit its internal request id, and the router matches a routed replica to its request by that
    id: the many engine calls of one HTTP request (n > 1, several prompts, stats of every replica)
    would collide and wait on each other."""
    return contextvars.Context().run(method.remote, *args, **kwargs)


def _detached(coro) -> asyncio.Task:
    """A task outside the current request's context: Ray Serve cancels the handle calls a request
    makes when that request is cancelled, and the shared stream or an abort must outlive it."""
    return asyncio.get_running_loop().create_task(coro, context=contextvars.Context())


class _ReplicaLink:
    """This client's output stream from one engine replica, and the requests waiting on it."""

    def __init__(self, replica: str, listener: asyncio.Task) -> None:
        self.replica = replica
        self.listener = listener
        self.request_ids: set[str] = set()


class ServeEngineClient:
    """The engine side seen from the Ingress."""

    def __init__(self, engine: DeploymentHandle, stream_mode: str = "multiplexed"):
        if stream_mode not in ("multiplexed", "per_request"):
            raise ValueError(
                f"stream_mode must be 'multiplexed' or 'per_request', got {stream_mode!r}"
            )
        self._handle = engine
        self._stream = engine.options(stream=True)
        self.stream_mode = stream_mode
        self._caller_id = f"ingress-{uuid.uuid4().hex}"
        self._queues: dict[str, asyncio.Queue] = {}
        self._links: dict[str, _ReplicaLink] = {}
        self._keepalive: asyncio.Task | None = None
        self._aborts: dict[str | None, list[str]] = {}  # replica (None: unknown) -> request ids
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
        """Start renewing this client's leases (output streams open with the first request on a replica)."""
        if self._keepalive is None or self._keepalive.done():
            self._keepalive = _detached(self._renew_leases())

    async def close(self) -> None:
        """Drop the output streams and the leases (the engines abort this client's requests)."""
        tasks = [
            t
            for t in [self._keepalive, *(link.listener for link in self._links.values())]
            if t is not None and not t.done()
        ]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _replicas(self) -> list[str]:
        """Every engine replica this process's router knows, and any this client streams from."""
        known = registry.known_replicas(self._handle.app_name, self._handle.deployment_name)
        return sorted(set(known) | set(self._links))

    async def _renew_leases(self) -> None:
        """Every KEEPALIVE_INTERVAL_S, renew the lease on each replica, each renewal on its own: one
        that hangs (its replica is gone) must not hold up the others past their lease."""
        renewals: dict[str | None, asyncio.Task] = {}
        while True:
            # Multiplexed: the replicas this client streams from. Per request: every replica (any may run
            # one); before the router knows any, an unpinned renewal goes wherever it places it.
            targets: list[str | None] = (
                self._replicas() if self.stream_mode == "per_request" else list(self._links)
            )
            if not targets and self.stream_mode == "per_request":
                targets = [None]
            for target in targets:
                if target not in renewals or renewals[target].done():
                    renewals[target] = asyncio.ensure_future(self._renew(target))
            for target in [t for t, task in renewals.items() if task.done() and t not in targets]:
                del renewals[target]
            await asyncio.sleep(KEEPALIVE_INTERVAL_S)

    async def _renew(self, replica: str | None) -> None:
        pin = {PIN_KWARG: replica} if replica is not None else {}
        try:
            await asyncio.wait_for(
                self._handle.keepalive.remote(self._caller_id, **pin), timeout=10
            )
        except Exception as exc:  # the engine is down: the health probe notices; keep trying
            logger.debug("keepalive of %s failed: %s", replica, type(exc).__name__)

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await _own_call(getattr(self._handle, method), *args, **kwargs)
        except Exception as exc:
            if _backpressure(
                exc
            ):  # Ray Serve's own queue bound: an overload answer (429), not an outage
                raise EngineOverloaded(
                    "the server is busy; retry shortly", retry_after_s=1
                ) from None
            if _unavailable(exc):
                self._lost(exc)
                raise EngineUnavailable(ENGINE_GONE) from None
            raise

    # ---- plain calls ----
    async def model_info(self) -> dict[str, Any]:
        return await _own_call(self._handle.model_info)

    async def stats(self) -> EngineStats:
        """All replicas' stats, combined (one replica's as they are)."""
        replicas = self._replicas()
        if len(replicas) <= 1:
            return await self._call("stats")
        parts = await asyncio.gather(
            *(self._call("stats", **{PIN_KWARG: r}) for r in replicas), return_exceptions=True
        )
        alive = [p for p in parts if isinstance(p, EngineStats)]
        if not alive:
            raise next(p for p in parts if isinstance(p, BaseException))
        return combine_stats(alive)

    async def flush_cache(self) -> None:
        replicas = self._replicas()
        if len(replicas) <= 1:
            await self._call("flush_cache")
            return
        await asyncio.gather(*(self._call("flush_cache", **{PIN_KWARG: r}) for r in replicas))

    # ---- aborts, batched ----
    def _abort_later(self, replica: str | None, request_id: str) -> None:
        self._aborts.setdefault(replica, []).append(request_id)
        if self._abort_flush is None or self._abort_flush.done():
            self._abort_flush = _detached(self._flush_aborts())

    async def _flush_aborts(self) -> None:
        await asyncio.sleep(0)  # let the other choices of the same HTTP request queue theirs
        while self._aborts:
            batches, self._aborts = self._aborts, {}
            for replica, request_ids in batches.items():
                # A submit that failed before a replica answered may still have started somewhere: ask them all.
                targets = [replica] if replica is not None else (self._replicas() or [None])
                for target in targets:
                    pin = {PIN_KWARG: target} if target is not None else {}
                    try:
                        await asyncio.wait_for(
                            self._handle.abort.remote(self._caller_id, request_ids, **pin),
                            timeout=30,
                        )
                    except Exception as exc:  # the engine is gone: nothing left to abort
                        logger.info(
                            "abort of %d requests failed: %s", len(request_ids), type(exc).__name__
                        )

    # ---- generation ----
    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Chunks of one request. Closing this iterator early (or cancelling the task iterating it)
        aborts the request in the engine, which frees its pages."""
        if self.stream_mode == "per_request":
            return self._generate_per_request(request_id, prompt_token_ids, params)
        return self._generate_multiplexed(request_id, prompt_token_ids, params)

    async def _generate_per_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        await self.start()
        response = _own_call(
            self._stream.generate, self._caller_id, request_id, prompt_token_ids, params
        )
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

    def _link(self, replica: str) -> _ReplicaLink:
        """The output stream from `replica`, opened on first use. The replica keeps a request's chunks
        until the stream takes them, so a stream opened after `submit` returned loses nothing."""
        link = self._links.get(replica)
        if link is None or link.listener.done():
            link = _ReplicaLink(replica, _detached(self._listen(replica)))
            self._links[replica] = link
        return link

    async def _listen(self, replica: str) -> None:
        response = self._stream.subscribe.remote(self._caller_id, **{PIN_KWARG: replica})
        lost: BaseException = EngineUnavailable("the engine's output stream ended")
        try:
            # The replica answers at once; one that is gone would leave the pinned call waiting for it forever.
            await asyncio.wait_for(response.__anext__(), timeout=SUBSCRIBE_TIMEOUT_S)
            async for batch in response:
                for request_id, item in batch:
                    queue = self._queues.get(request_id)
                    if queue is not None:
                        queue.put_nowait(item)
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as exc:  # the engine replica died or restarted (or never answered)
            lost = exc
            response.cancel()
        link = self._links.pop(replica, None)
        self._lost(lost)
        for request_id in link.request_ids if link is not None else ():
            queue = self._queues.get(request_id)
            if queue is not None:
                queue.put_nowait(EngineUnavailable(ENGINE_GONE))

    async def _generate_multiplexed(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        if request_id in self._queues:
            raise InvalidRequest("request_id", f"request id {request_id!r} is already running")
        await self.start()
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        finished, link = False, None
        try:
            replica = await self._call(
                "submit", self._caller_id, request_id, prompt_token_ids, params
            )
            link = self._link(replica)
            link.request_ids.add(request_id)
            registry.track(replica, 1)
            while not finished:
                item = await queue.get()
                if isinstance(item, Exception):  # refused or failed: nothing more comes
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if link is not None:
                link.request_ids.discard(request_id)
                registry.track(link.replica, -1)
            if (
                not finished
            ):  # the caller left early (or submit failed): harmless if it never started
                self._abort_later(link.replica if link is not None else None, request_id)
