"""The engine side of a Ray Serve replica, whatever its role: one `AsyncLLMEngine` and the ways its
callers stream output back. `EngineServer` (colocated) and `DecodeServer` (Semi-PD) are this with
different engines behind it.

Two ways to stream a request's output back (every streamed Ray item costs ~0.5-1 ms of the
engine process's CPU, the process that also runs the model):

- `generate(...)`: one streaming call per request (`handle.options(stream=True).generate.remote`);
  one Ray item per chunk. Simple; used by any caller that wants one request.
- `submit(...)` + `subscribe(...)`: a caller (an Ingress replica) holds ONE long-lived stream and
  submits requests with short calls; each item of the stream is a list of `(request_id, chunk)` for
  all of its requests, so items scale with engine steps, not with requests x chunks.

Both carry the engine's chunks: the first token at once, later ones `stream_interval` tokens at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator

from deployments.autoscaling_policy import autoscaling_signals
from edgeacc_ray.config import ServeConfig
from edgeacc_ray.engine import AsyncLLMEngine
from edgeacc_ray.engine.hardware import pin_process, restore_priority
from edgeacc_ray.engine.request import (
    EngineStats,
    EngineUnavailable,
    InvalidRequest,
    RequestOutput,
    SamplingParams,
)
from edgeacc_ray.engine.semi_pd import PrefillExecutor

logger = logging.getLogger("ray.serve")

# Serve options every engine-side deployment (EngineServer, DecodeServer, PrefillServer) shares.
ENGINE_REPLICA_OPTIONS: dict[str, Any] = dict(
    ray_actor_options={
        "num_cpus": 0
    },  # Ray's default of 1 CPU per replica does not fit a 2-core box
    health_check_period_s=10,
    health_check_timeout_s=60,
    graceful_shutdown_timeout_s=5,
    # No access log lines for engine calls (submit, keepalive, stats): internal, and under load their
    # logging costs the box more than the calls.
    logging_config={"enable_access_log": False},
)


# A caller (an Ingress replica's ServeEngineClient) renews its lease every KEEPALIVE_INTERVAL_S; one that
# stays silent for CALLER_LEASE_S is gone (a killed Ingress cancels nothing), and its requests are aborted.
KEEPALIVE_INTERVAL_S = 0.5
CALLER_LEASE_S = 5.0


def _client_error(request_id: str, exc: Exception) -> Exception:
    """What a caller is told when its request ends in an error: the engine's typed errors as they are;
    anything else is a bug, whose details stay in this log while the caller gets a stable message."""
    if isinstance(exc, (InvalidRequest, EngineUnavailable)):
        return exc
    logger.error("request %s failed in the engine", request_id, exc_info=exc)
    return EngineUnavailable("the engine failed while running this request")


class MisroutedCall(RuntimeError):
    """A call pinned to another replica reached this one: a routing bug, never silently served, since
    chunks sent to a stream on the wrong replica would be lost."""


def check_pin(pinned: str | None, own: str | None) -> None:
    """Refuse a call pinned (`replica=`) to another replica than this one."""
    if pinned is not None and pinned != own:
        raise MisroutedCall(f"a call for replica {pinned} reached replica {own}")


def own_replica_id() -> str | None:
    """This replica's unique id (what `EngineRouter` pins calls with), or None outside Ray Serve."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:
        return None


class _Caller:
    """One caller's requests, its outbox (chunks of all its requests, handed out in batches) and lease."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any]] = []
        self.ready = asyncio.Event()
        self.tasks: dict[str, asyncio.Task] = {}
        self.last_seen = time.monotonic()
        self.expired = (
            False  # its lease ran out: its stream ends, and the caller must subscribe anew
        )

    def put(self, request_id: str, item: Any) -> None:
        self.items.append((request_id, item))
        self.ready.set()

    async def take(self) -> list[tuple[str, Any]] | None:
        """The items since the last call, once there are any; None once the lease has expired."""
        while not self.items and not self.expired:
            self.ready.clear()
            await self.ready.wait()
        if self.expired:
            return None
        batch, self.items = self.items, []
        return batch

    def expire(self) -> int:
        """End the caller's stream and abort its requests; how many there were."""
        self.expired = True
        self.ready.set()
        return self.abort_all()

    def abort_all(self) -> int:
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        return len(tasks)


class EngineService:
    """Owns one engine: the native `AsyncLLMEngine` (its step loop runs in a thread of this replica), or
    what `make_engine` returns in a subclass (the SGLang servers' `SGLangEngine`, with the same calls)."""

    def __init__(self, cfg: ServeConfig, prefill_executor: PrefillExecutor | None = None):
        if cfg.engine_cpu_cores:
            pin_process(cfg.engine_cpu_cores)
        restore_priority()
        self.config = cfg
        self.engine = self.make_engine(cfg, prefill_executor)
        self._callers: dict[str, _Caller] = {}
        self._reaper: asyncio.Task | None = None
        self.replica_id = own_replica_id()
        logger.info("%s ready: %s", type(self).__name__, self.engine.model_info)

    def make_engine(self, cfg: ServeConfig, prefill_executor: PrefillExecutor | None) -> Any:
        """The engine behind this replica."""
        return AsyncLLMEngine(cfg.engine_config(), prefill_executor)

    # ---- callers and their leases ----
    def _caller(self, caller_id: str) -> _Caller:
        caller = self._callers.get(caller_id)
        if caller is None:
            caller = self._callers[caller_id] = _Caller()
        caller.last_seen = time.monotonic()
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.ensure_future(self._reap())
        return caller

    async def keepalive(self, caller_id: str, replica: str | None = None) -> None:
        """Renew the caller's lease."""
        check_pin(replica, self.replica_id)
        self._caller(caller_id)

    async def _reap(self) -> None:
        """Abort the requests of callers whose lease ran out (their process died)."""
        while self._callers:
            await asyncio.sleep(KEEPALIVE_INTERVAL_S)
            deadline = time.monotonic() - CALLER_LEASE_S
            for caller_id, caller in list(self._callers.items()):
                if caller.last_seen < deadline:
                    del self._callers[caller_id]
                    aborted = caller.expire()
                    logger.warning(
                        "caller %s stopped renewing its lease: aborted its %d requests",
                        caller_id,
                        aborted,
                    )

    # ---- one streaming call per request ----
    async def generate(
        self, caller_id: str, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput | Exception]:
        """Yield the request's chunks; a refused or failed request yields its error (a typed exception)
        as the last item. Cancelling this generator (the caller cancelled) aborts the request, and so
        does the caller's lease running out."""
        caller = self._caller(caller_id)
        chunks = self.engine.generate(request_id, prompt_token_ids, params)
        caller.tasks[request_id] = asyncio.current_task()
        try:
            async for chunk in chunks:
                yield chunk
        except Exception as exc:
            yield _client_error(request_id, exc)
        finally:
            caller.tasks.pop(request_id, None)
            await chunks.aclose()

    # ---- many requests over one stream ----
    async def submit(
        self, caller_id: str, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> str | None:
        """Start a request whose chunks (or its error) go to `caller_id`'s stream on this replica;
        returns this replica's id, which the caller subscribes to."""
        caller = self._caller(caller_id)
        if request_id in caller.tasks:
            caller.put(
                request_id,
                InvalidRequest("request_id", f"request id {request_id!r} is already running"),
            )
        else:
            caller.tasks[request_id] = asyncio.ensure_future(
                self._pump(caller, request_id, prompt_token_ids, params)
            )
        return self.replica_id

    async def _pump(
        self, caller: _Caller, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        chunks = self.engine.generate(request_id, prompt_token_ids, params)
        try:
            async for chunk in chunks:
                caller.put(request_id, chunk)
        except Exception as exc:
            caller.put(request_id, _client_error(request_id, exc))
        finally:
            await chunks.aclose()  # not finished: aborts the request, its pages return
            caller.tasks.pop(request_id, None)

    async def subscribe(
        self, caller_id: str, replica: str | None = None
    ) -> AsyncIterator[list[tuple[str, Any]]]:
        """The caller's stream: lists of (request_id, RequestOutput | error), as they come. When the
        caller goes away (this generator is cancelled, or its lease runs out), its requests are aborted."""
        check_pin(replica, self.replica_id)
        caller = self._caller(caller_id)
        try:
            yield []  # subscribed
            while (batch := await caller.take()) is not None:
                yield batch
        finally:
            if self._callers.get(caller_id) is caller:
                del self._callers[caller_id]
            caller.abort_all()

    async def abort(
        self, caller_id: str, request_ids: list[str], replica: str | None = None
    ) -> int:
        """Abort submitted requests (their client went away); how many were still running."""
        check_pin(replica, self.replica_id)
        caller = self._callers.get(caller_id)
        if caller is None:
            return 0
        tasks = [caller.tasks[r] for r in request_ids if r in caller.tasks]
        for task in tasks:
            task.cancel()
        return len(tasks)

    # ---- introspection ----
    def model_info(self) -> dict[str, Any]:
        return dict(self.engine.model_info)

    def stats(self, replica: str | None = None) -> EngineStats:
        check_pin(replica, self.replica_id)
        return self.engine.stats()

    def flush_cache(self, replica: str | None = None) -> None:
        check_pin(replica, self.replica_id)
        self.engine.flush_cache()

    # ---- what Ray Serve asks every replica for (the router's load, the autoscaler's signals) ----
    def record_routing_stats(self) -> dict[str, Any]:
        """`EngineRouter`'s load signal."""
        s = self.engine.stats()
        return {
            "load": s.num_running + s.num_waiting + s.num_prefilling + s.num_loading,
            "kv_usage": s.kv_usage,
        }

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The signals of `deployments.autoscaling_policy` (Serve averages them over its look-back)."""
        return autoscaling_signals(self.engine.stats())

    def check_health(self) -> None:
        if not self.engine.is_alive():
            raise RuntimeError("the engine's step loop has stopped")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            try:
                engine.shutdown()
            except Exception:  # pragma: no cover - best effort at teardown
                pass
