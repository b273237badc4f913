"""`SGLangEngine`: an SGLang engine behind the calls `EngineService` makes of its engine (the same as
`AsyncLLMEngine`'s: generate / abort / stats / flush_cache / model_info / is_alive / shutdown).

SGLang's `Engine` runs its TokenizerManager on an asyncio loop of the process that built it, and its
blocking helpers (`flush_cache`, `get_server_info`) call `loop.run_until_complete`, which cannot run inside
a Ray Serve replica's running loop. So the engine lives on a loop of its own, in one thread (as the native
engine's step loop does): callers' streams are fed from there, and a blocking call waits on that loop,
never on the replica's. SGLang is imported here only, when a replica starts.

Placement: a colocated engine is SGLang's `RayEngine`, whose TP ranks are Ray actors (one whole GPU each)
in the replica's placement group; a semi_pd engine is the plain `Engine` on the fraction of one GPU
Ray gave the replica (its scheduler is a subprocess that inherits CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

from edgeacc_ray.engine.request import (
    EngineOverloaded,
    EngineStats,
    EngineUnavailable,
    InvalidRequest,
    LatencyMetrics,
    RequestOutput,
    SamplingParams,
)
from edgeacc_ray.sglang_backend.outputs import SGLangStream
from edgeacc_ray.sglang_backend.pd_messages import BootstrapAddress, PrefillRequest
from edgeacc_ray.sglang_backend.requests import logprob_args, sampling_params
from edgeacc_ray.sglang_backend.server_args import DEFAULT_BOOTSTRAP_PORT, Role, server_args

if TYPE_CHECKING:
    from edgeacc_ray.config import ServeConfig

logger = logging.getLogger("ray.serve")

INSTALL_HINT = "install the `sglang` extra on the GPU nodes: pip install 'edgeacc-ray[sglang]'"
LOAD_POLL_S = 0.5  # how often the scheduler's load snapshot is read (what stats() reports)
CALL_TIMEOUT_S = 60.0


class SGLangNotInstalled(ImportError):
    """SGLang (or the part of it a placement needs) does not import in this process."""


def sglang_engine_class(ray_ranks: bool) -> type:
    """SGLang's engine class: `RayEngine` (TP ranks as Ray actors in our placement group) or `Engine`."""
    try:
        if ray_ranks:
            from sglang.srt.ray.engine import RayEngine

            return RayEngine
        from sglang import Engine

        return Engine
    except ImportError as exc:
        raise SGLangNotInstalled(f"SGLang does not import ({exc}); {INSTALL_HINT}") from exc


class PrefillLink(Protocol):
    """The decode engine's way to its prefill engines (semi_pd): start a request's prefill, learn where
    its KV will be served, and cancel it if the request ends first."""

    async def start(self, request: PrefillRequest) -> BootstrapAddress: ...

    def cancel(self, request_id: str) -> None: ...


class SGLangEngine:
    """One SGLang engine of a replica, in `role` colocated, prefill or decode (with `prefill` its link)."""

    def __init__(
        self,
        cfg: "ServeConfig",
        model_path: str,
        role: Role,
        *,
        rank_bundles: list[int] | None = None,
        bootstrap_port: int = DEFAULT_BOOTSTRAP_PORT,
        prefill: PrefillLink | None = None,
    ) -> None:
        """`rank_bundles`: the placement-group bundles (one GPU each) of the TP ranks, for `RayEngine`;
        None: the plain Engine on this process's own GPU share."""
        self.config, self.role, self._prefill = cfg, role, prefill
        self._engine_class = sglang_engine_class(rank_bundles is not None)
        kwargs = server_args(cfg, model_path, role, bootstrap_port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="edgeacc-sglang", daemon=True
        )
        self._thread.start()
        self._running = True
        self._loads: list[Any] = []
        self._in_flight = 0
        self._counters = dict(prompt=0, generated=0, cached=0, finished=0, aborted=0, rejected=0)
        self.latency = LatencyMetrics()
        try:
            self.engine = self._wait(self._start(kwargs, rank_bundles), timeout=None)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise
        self.model_info = self._model_info(model_path)
        self._poller = asyncio.run_coroutine_threadsafe(self._poll_loads(), self._loop)

    # ---- the engine's own loop -----------------------------------------------------------------
    def _wait(self, coro: Any, timeout: float | None = CALL_TIMEOUT_S) -> Any:
        """Run `coro` on the engine's loop and wait for it (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self, kwargs: dict[str, Any], rank_bundles: list[int] | None) -> Any:
        """Build the engine on its loop (the TokenizerManager binds to the loop it starts on)."""
        if rank_bundles is None:
            return self._engine_class(**kwargs)
        import ray

        os.environ["SGLANG_RAY_BUNDLE_INDICES"] = ",".join(
            map(str, rank_bundles)
        )  # read by RayEngine's launch
        return self._engine_class(placement_group=ray.util.get_current_placement_group(), **kwargs)

    def _model_info(self, model_path: str) -> dict[str, Any]:
        tm = self.engine.tokenizer_manager
        return dict(
            model_path=model_path,
            max_model_len=int(tm.context_len),
            vocab_size=tm.model_config.vocab_size,
            page_size=self.config.page_size,
            device="cuda",
            backend="sglang",
            role=self.role,
            tensor_parallel_size=self.config.tensor_parallel_size,
        )

    async def _poll_loads(self) -> None:
        """Keep the scheduler's latest load snapshot (SGLang >= 0.5.x `get_loads`; older: none, and stats
        count this replica's own requests)."""
        get_loads = getattr(self.engine.tokenizer_manager, "get_loads", None)
        while self._running and get_loads is not None:
            try:
                self._loads = list(await get_loads())
            except Exception as exc:  # a snapshot is a hint; the next one may come
                logger.debug("SGLang load snapshot failed: %s", exc)
            await asyncio.sleep(LOAD_POLL_S)

    async def _pump(
        self,
        request: dict[str, Any],
        stream: SGLangStream,
        caller: asyncio.AbstractEventLoop,
        outbox: asyncio.Queue,
    ) -> None:
        """Feed one request's chunks (or its typed error) to the caller's loop."""

        def put(item: RequestOutput | BaseException) -> None:
            caller.call_soon_threadsafe(outbox.put_nowait, item)

        try:
            async for item in await self.engine.async_generate(**request):
                put(stream.chunk(item))
        except (InvalidRequest, EngineUnavailable) as exc:  # SGLang answered with an abort status
            put(exc)
        except (
            ValueError
        ) as exc:  # TokenizerManager's refusal of a request: its message is for the client
            put(InvalidRequest("request", str(exc), code="sglang_rejected"))
        except Exception as exc:  # noqa: BLE001 - EngineService logs it and answers EngineUnavailable
            put(exc)

    # ---- the engine interface ------------------------------------------------------------------
    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's output; leaving early aborts it in SGLang (and its prefill, under semi_pd)."""
        if not self.is_alive():
            raise EngineUnavailable("the SGLang engine has stopped")
        request: dict[str, Any] = dict(
            input_ids=list(prompt_token_ids),
            sampling_params=sampling_params(params),
            rid=request_id,
            stream=True,
            **logprob_args(params),
        )
        arrival, first, previous = time.monotonic(), None, None
        if self._prefill is not None:
            prefill = PrefillRequest(request_id, request["input_ids"], request["sampling_params"])
            address = await self._prefill.start(prefill)
            request.update(
                bootstrap_host=address.host,
                bootstrap_port=address.port,
                bootstrap_room=prefill.room,
            )
        outbox: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        pump = asyncio.run_coroutine_threadsafe(
            self._pump(
                request,
                SGLangStream(request_id, params.stop_token_ids),
                asyncio.get_running_loop(),
                outbox,
            ),
            self._loop,
        )
        self._in_flight += 1
        out: RequestOutput | None = None
        try:
            while out is None or not out.finished:
                item = await outbox.get()
                if isinstance(item, BaseException):
                    if isinstance(item, EngineOverloaded):
                        self._counters["rejected"] += 1
                    raise item
                out, now = item, time.monotonic()
                if out.token_ids:
                    self.latency.token(arrival, first, previous, now)
                    first, previous = first or now, now
                yield out
        finally:
            self._in_flight -= 1
            if out is not None and out.finished and out.finish_reason != "abort":
                self._count_finished(out)
                self.latency.finished(arrival, first, out.num_output_tokens, time.monotonic())
            else:
                self._counters["aborted"] += 1
                self.abort(request_id)
                pump.cancel()
                if self._prefill is not None:
                    self._prefill.cancel(request_id)

    async def run_prefill(self, request: PrefillRequest, address: BootstrapAddress) -> None:
        """semi_pd, prefill side: compute the prompt's KV for the decode engine that names the same room.
        Cancelling (the decode side gave up on the request) aborts it here."""
        args = dict(
            input_ids=request.prompt_token_ids,
            sampling_params=request.sampling,
            rid=request.request_id,
            stream=False,
            bootstrap_host=address.host,
            bootstrap_port=address.port,
            bootstrap_room=request.room,
        )
        done = asyncio.run_coroutine_threadsafe(self.engine.async_generate(**args), self._loop)
        try:
            await asyncio.wrap_future(done)
        finally:
            if not done.done():
                self.abort(request.request_id)
                done.cancel()

    def _count_finished(self, out: RequestOutput) -> None:
        c = self._counters
        c["finished"] += 1
        c["prompt"] += out.num_prompt_tokens
        c["cached"] += out.num_cached_tokens
        c["generated"] += out.num_output_tokens

    def abort(self, request_id: str) -> None:
        """Stop a request in SGLang (its scheduler frees the request's KV)."""
        if self._running:
            self._loop.call_soon_threadsafe(self.engine.tokenizer_manager.abort_request, request_id)

    def stats(self) -> EngineStats:
        """Load from the scheduler's last snapshot (pages are SGLang's tokens / page_size); counters and
        latency as this replica saw its requests."""
        loads, page, c = self._loads, self.config.page_size, self._counters
        total_tokens = sum(load.max_total_num_tokens for load in loads)
        used_tokens = sum(load.num_used_tokens for load in loads)
        running = sum(load.num_running_reqs for load in loads) if loads else self._in_flight
        return EngineStats(
            num_running=running,
            num_waiting=sum(load.num_waiting_reqs for load in loads),
            num_free_pages=(total_tokens - used_tokens) // page,
            num_total_pages=total_tokens // page,
            page_size=page,
            num_cached_pages=0,
            prompt_tokens_total=c["prompt"],
            generation_tokens_total=c["generated"],
            cached_prompt_tokens_total=c["cached"],
            requests_finished_total=c["finished"],
            requests_aborted_total=c["aborted"],
            pd_mode=self.config.pd_mode,
            latency=self.latency.snapshot(),
            running_bound=self.config.max_num_seqs,
            reserved_pages=used_tokens // page,
            rejected_total=c["rejected"],
        )

    def flush_cache(self) -> bool:
        """Drop SGLang's prefix cache (refused by SGLang while requests run)."""
        result = self._wait(self.engine.tokenizer_manager.flush_cache())
        return bool(getattr(result, "success", result))

    def is_alive(self) -> bool:
        return self._running and self._thread.is_alive()

    def shutdown(self) -> None:
        """Stop SGLang's processes (and its Ray rank actors) and the loop."""
        if not self._running:
            return
        self._running = False
        try:
            self._wait(asyncio.to_thread(self.engine.shutdown), timeout=CALL_TIMEOUT_S)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
