"""The engine for servers: the step loop runs in a background thread; callers on an asyncio loop
get each request's output as an async stream of chunks.

All scheduler state is touched by the engine thread only: `generate` and `abort` post commands to
it, and it posts chunks back onto the caller's event loop. A chunk carries every token produced
since the caller last read; after the first token (which leaves at once, as with SGLang's
--stream-interval) at least `stream_interval` tokens unless the request finished.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any, Callable

from edgeacc_ray.config import EngineConfig
from edgeacc_ray.engine.kv import StorageSpec
from edgeacc_ray.engine.llm_engine import LLMEngine
from edgeacc_ray.engine.request import (
    EngineStats,
    EngineUnavailable,
    InvalidRequest,
    RequestOutput,
    SamplingParams,
    merge_outputs,
)
from edgeacc_ray.engine.semi_pd import PrefillExecutor

logger = logging.getLogger(__name__)


class AsyncLLMEngine:
    def __init__(
        self, config: EngineConfig, prefill_executor: PrefillExecutor | None = None
    ) -> None:
        self.config = config
        self._prefill_executor = prefill_executor
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._running = True
        self._error: BaseException | None = None
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="edgeacc-engine", daemon=True
        )
        self._thread.start()
        ready.wait()
        if self._error is not None:
            raise self._error

    # -- public API (any thread / event loop) ---------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def storage_spec(self) -> StorageSpec:
        """Semi-PD: the shared segment a prefill process maps."""
        return self.engine.pd.spec

    @property
    def model_info(self) -> dict:
        return self.engine.model_info

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's output; leaving the loop early (or cancellation) aborts the request.
        A request the engine refuses raises InvalidRequest or EngineOverloaded on the first iteration;
        one that waited too long to start raises QueueTimeout."""
        self._raise_if_dead()
        if request_id in self._streams:
            raise InvalidRequest("request_id", f"request id {request_id!r} is already running")
        matcher = None
        if params.structured is not None:  # compile off the step loop and off this event loop
            matcher = await asyncio.to_thread(self.engine.grammars.matcher, params.structured)
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = (loop, chunks)
        self._post(lambda: self._add(request_id, prompt_token_ids, params, matcher))
        finished, interval = False, 1
        try:
            while not finished:
                merged = await self._next_chunk(chunks, interval)
                finished, interval = merged.finished, self.config.stream_interval
                yield merged
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request; its stream (if someone still reads it) ends with finish_reason "abort"."""
        self._post(lambda: self._abort(request_id))

    def is_alive(self) -> bool:
        """True while the step loop runs and the engine's ranks answer (health checks)."""
        return self._thread.is_alive() and self._error is None and self.engine.healthy()

    def stats(self) -> EngineStats:
        return self.engine.stats()  # counters are plain ints: a racy but consistent-enough snapshot

    def flush_cache(self) -> bool:
        done: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._post(lambda: done.put(self.engine.flush_cache()))
        return done.get(timeout=60)

    def shutdown(self) -> None:
        self._running = False
        self._wakeup.set()
        self._thread.join(timeout=30)
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

    # -- caller side ----------------------------------------------------------------------------
    async def _next_chunk(self, chunks: asyncio.Queue, interval: int) -> RequestOutput:
        """Wait for output, then merge everything queued, until `interval` tokens or the end."""
        merged: RequestOutput | None = None
        while True:
            item = await chunks.get()
            while True:
                if isinstance(item, BaseException):
                    raise item
                merged = merge_outputs(merged, item)
                if chunks.empty():
                    break
                item = chunks.get_nowait()
            if merged.finished or len(merged.token_ids) >= interval:
                return merged

    def _post(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        self._wakeup.set()

    def _raise_if_dead(self) -> None:
        if self._error is not None or not self._running:
            raise EngineUnavailable("the engine has stopped")

    # -- engine thread --------------------------------------------------------------------------
    def _run(self, ready: threading.Event) -> None:
        try:
            self.engine = LLMEngine(self.config, self._prefill_executor)
        except BaseException as exc:  # reported by __init__
            self._error = exc
            ready.set()
            return
        if self.engine.pd is not None:
            self.engine.pd.dispatcher.notify = self._wakeup.set
        if self.engine.tier is not None:
            self.engine.tier.notify = self._wakeup.set
        ready.set()
        try:
            while self._running:
                self._drain_commands()
                if not self.engine.has_unfinished() or self.engine.waiting_on_io():
                    self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out.request_id, out)
                for request_id, failure in self.engine.take_failures().items():
                    self._deliver(request_id, failure)
        except BaseException as exc:
            self._error = exc
            logger.exception(
                "the engine's step loop failed; failing %d requests", len(self._streams)
            )
            error = (
                exc
                if isinstance(exc, EngineUnavailable)
                else EngineUnavailable(  # typed: e.g. a lost TP rank
                    "the engine stopped while running this request"
                )
            )
            for request_id in list(self._streams):
                self._deliver(request_id, error)
            raise

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _abort(self, request_id: str) -> None:
        out = self.engine.abort(request_id)
        if out is not None:
            self._deliver(request_id, out)

    def _add(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, matcher: Any
    ) -> None:
        if request_id not in self._streams:  # aborted before it reached the engine
            return
        try:
            self.engine.add_request(request_id, prompt_token_ids, params, matcher)
        except (InvalidRequest, EngineUnavailable) as exc:  # refused, or EngineOverloaded
            self._deliver(request_id, exc)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, chunks = stream
            loop.call_soon_threadsafe(chunks.put_nowait, item)
