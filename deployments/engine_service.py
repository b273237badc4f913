"""The engine side of a Ray Serve replica, whatever its role: one `AsyncLLMEngine` and the ways its
callers stream output back. `EngineServer` (colocated) and `DecodeServer` (Semi-PD) are this with
different engines behind it.

Two ways to stream a request's output back (DESIGN §5: every streamed Ray item costs ~0.5-1 ms of the
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
import os
from typing import Any, AsyncIterator

from edgeacc_ray.config import ServeConfig
from edgeacc_ray.engine.async_engine import AsyncLLMEngine
from edgeacc_ray.engine.config import EngineConfig
from edgeacc_ray.engine.outputs import EngineStats, RequestOutput
from edgeacc_ray.engine.platform import pin_process
from edgeacc_ray.engine.prefill_dispatcher import PrefillExecutor
from edgeacc_ray.engine.sampling_params import SamplingParams

logger = logging.getLogger("ray.serve")

# Serve options every engine-side deployment (EngineServer, DecodeServer, PrefillServer) shares.
ENGINE_REPLICA_OPTIONS: dict[str, Any] = dict(
    ray_actor_options={"num_cpus": 0},  # DESIGN §5: Ray's default of 1 CPU per replica does not fit 2 cores
    health_check_period_s=10,
    health_check_timeout_s=60,
    graceful_shutdown_timeout_s=5,
)


def restore_priority() -> None:
    """Undo the niceness Ray gives worker processes (15 by default, `RAY_worker_niceness`) for this
    thread and the engine thread it starts: the engine is the work this box exists for, and at nice 15
    it loses its core to every other process (the HTTP proxy, a benchmark client). Needs the
    privilege to lower niceness (root or CAP_SYS_NICE); without it the process keeps Ray's value."""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > 0:
            os.setpriority(os.PRIO_PROCESS, 0, 0)  # Linux: this thread; threads started later inherit it
    except OSError as exc:
        logger.warning("this replica stays at Ray's worker niceness (%s); set RAY_worker_niceness=0 "
                       "before `ray start`/`serve run` to avoid it", exc)


class _Subscriber:
    """One caller's outbox: chunks of all its requests, handed out in batches."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any]] = []
        self.ready = asyncio.Event()
        self.tasks: dict[str, asyncio.Task] = {}

    def put(self, request_id: str, item: Any) -> None:
        self.items.append((request_id, item))
        self.ready.set()

    async def take(self) -> list[tuple[str, Any]]:
        while not self.items:
            self.ready.clear()
            await self.ready.wait()
        batch, self.items = self.items, []
        return batch


class EngineService:
    """Owns one `AsyncLLMEngine` (its step loop runs in a thread of this replica)."""

    def __init__(self, cfg: ServeConfig, prefill_executor: PrefillExecutor | None = None):
        if cfg.engine_cpu_cores:
            pin_process(cfg.engine_cpu_cores)
        restore_priority()
        self.config = cfg
        self.engine = AsyncLLMEngine(EngineConfig(**cfg.engine_config_kwargs()), prefill_executor)
        self._subscribers: dict[str, _Subscriber] = {}
        logger.info("%s ready: %s", type(self).__name__, self.engine.model_info)

    # ---- one streaming call per request ----
    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput | dict]:
        """Yield the request's chunks; a refused request yields one `{"error": message}` instead.
        Cancelling this generator (the caller cancelled) closes the engine's, which aborts the request."""
        started = False
        chunks = self.engine.generate(request_id, prompt_token_ids, params)
        try:
            async for chunk in chunks:
                started = True
                yield chunk
        except ValueError as exc:
            if started:
                raise
            yield {"error": str(exc)}
        finally:
            await chunks.aclose()

    # ---- many requests over one stream ----
    async def submit(self, subscriber_id: str, request_id: str, prompt_token_ids: list[int],
                     params: SamplingParams) -> str | None:
        """Start a request whose chunks go to `subscriber_id`'s stream. None, or why it was refused."""
        try:
            self.engine.check_request(prompt_token_ids, params)
        except ValueError as exc:
            return str(exc)
        sub = self._subscribers.setdefault(subscriber_id, _Subscriber())
        if request_id in sub.tasks:
            return f"request id {request_id!r} is already running"
        sub.tasks[request_id] = asyncio.ensure_future(self._pump(sub, request_id, prompt_token_ids, params))
        return None

    async def _pump(self, sub: _Subscriber, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams) -> None:
        chunks = self.engine.generate(request_id, prompt_token_ids, params)
        try:
            async for chunk in chunks:
                sub.put(request_id, chunk)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # refused late (ValueError) or the engine failed
            sub.put(request_id, {"error": str(exc), "kind": type(exc).__name__})
        finally:
            await chunks.aclose()  # not finished: aborts the request, its pages return
            sub.tasks.pop(request_id, None)

    async def subscribe(self, subscriber_id: str) -> AsyncIterator[list[tuple[str, Any]]]:
        """The caller's stream: lists of (request_id, RequestOutput | {"error": ...}), as they come.
        When the caller goes away (this generator is cancelled), all of its requests are aborted."""
        sub = self._subscribers.setdefault(subscriber_id, _Subscriber())
        try:
            yield []  # subscribed
            while True:
                yield await sub.take()
        finally:
            if self._subscribers.get(subscriber_id) is sub:
                del self._subscribers[subscriber_id]
            for task in list(sub.tasks.values()):
                task.cancel()

    async def abort(self, subscriber_id: str, request_id: str) -> bool:
        """Abort a submitted request (the caller lost interest). False if it was not running."""
        sub = self._subscribers.get(subscriber_id)
        task = sub.tasks.get(request_id) if sub else None
        if task is None:
            return False
        task.cancel()
        return True

    # ---- introspection ----
    def model_info(self) -> dict[str, Any]:
        return dict(self.engine.model_info)

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> str | None:
        """None when the engine would take the request, else the reason."""
        try:
            self.engine.check_request(prompt_token_ids, params)
        except ValueError as exc:
            return str(exc)
        return None

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def flush_cache(self) -> bool:
        return bool(self.engine.flush_cache())

    def check_health(self) -> None:
        alive = getattr(self.engine, "is_alive", None)
        if callable(alive):
            ok = alive()
        else:  # until the engine has a public liveness check
            thread = getattr(self.engine, "_thread", None)
            ok = thread is None or thread.is_alive()
        if not ok:
            raise RuntimeError("the engine's step loop has stopped")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            try:
                engine.shutdown()
            except Exception:  # pragma: no cover - best effort at teardown
                pass
