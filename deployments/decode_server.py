"""Semi-PD's decode deployment: the engine that owns the weights, the KV pool (in a shared segment)
and page allocation, decodes every running request, and sends prompts to the PrefillServer as page
ids and token ids. The Ingress talks to it exactly as to the colocated EngineServer."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import threading
import time
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

import deployments.replica_registry as replica_registry
from deployments.engine_service import ENGINE_REPLICA_OPTIONS, EngineService
from edgeacc_ray.config import ServeConfig
from edgeacc_ray.engine.kv import sweep_stale_segments
from edgeacc_ray.engine.semi_pd import (
    PrefillBatch,
    PrefillBatchResult,
    PrefillFailed,
    PrefillReplicaTaken,
)

logger = logging.getLogger("ray.serve")

CLAIM_TIMEOUT_S = 120.0  # a replaced prefill replica takes Serve seconds to restart
CLAIM_RETRY_S = 0.2
PIN_CHECK_S = 1.0  # while a batch runs, how often to check that its prefill replica still exists


class RayPrefillExecutor:
    """Runs prefill batches on the PrefillServer replica this decode replica claimed (`claim`), pinned
    to it through `EngineRouter`; claims another when that one is gone (Serve replaced it). The engine
    thread submits; a small pool of threads waits on the handle calls, so the step loop never blocks."""

    def __init__(self, prefill: DeploymentHandle, max_in_flight: int) -> None:
        self._handle = prefill
        self._threads = cf.ThreadPoolExecutor(
            max_workers=max_in_flight, thread_name_prefix="edgeacc-prefill-call"
        )
        self._claim_lock = threading.Lock()
        self._pin: str | None = None

    def submit(self, batch: PrefillBatch) -> cf.Future:
        return self._threads.submit(self._call, batch)

    def _call(self, batch: PrefillBatch) -> PrefillBatchResult:
        try:
            pin = self._paired()
            response = self._handle.prefill.remote(batch, replica=pin)
            while (
                True
            ):  # Serve retries a call whose replica died, and a pinned retry would wait for it
                try:
                    return response.result(timeout_s=PIN_CHECK_S)
                except TimeoutError:
                    if self._gone(pin):
                        response.cancel()
                        raise PrefillFailed(
                            "the prefill server was replaced; retry the request"
                        ) from None
        except PrefillFailed:
            raise
        except Exception as exc:  # the prefill replica died or refused: these requests fail cleanly
            logger.warning(
                "prefill batch of %d requests failed: %s", len(batch.tasks), type(exc).__name__
            )
            raise PrefillFailed(
                f"the prefill server failed ({type(exc).__name__}); retry the request"
            ) from None

    def _paired(self) -> str:
        """The prefill replica of this pair: claimed on first use, and again once the router no longer
        lists it (it died, or Serve replaced it)."""
        with self._claim_lock:
            if self._pin is None or self._gone(self._pin):
                self._pin = self._claim()
            return self._pin

    def _gone(self, replica: str) -> bool:
        return replica_registry.gone(self._handle.app_name, self._handle.deployment_name, replica)

    def _claim(self) -> str:
        deadline = time.monotonic() + CLAIM_TIMEOUT_S
        while True:
            try:
                replica = self._handle.claim.remote(os.getpid()).result(timeout_s=CLAIM_TIMEOUT_S)
                logger.info("paired with prefill replica %s", replica)
                return replica
            except PrefillReplicaTaken:
                if time.monotonic() > deadline:
                    raise PrefillFailed(
                        "no prefill replica is free to pair with; retry the request"
                    ) from None
                time.sleep(CLAIM_RETRY_S)


@serve.deployment(name="DecodeServer", max_ongoing_requests=1024, **ENGINE_REPLICA_OPTIONS)
class DecodeServer(EngineService):
    def __init__(self, config: dict[str, Any], prefill: DeploymentHandle):
        cfg = ServeConfig.model_validate(config)
        removed = sweep_stale_segments()  # left by a decode replica that was killed
        if removed:
            logger.info("removed %d shared segments of dead processes: %s", len(removed), removed)
        executor = RayPrefillExecutor(prefill, cfg.max_prefill_batches_in_flight)
        super().__init__(cfg, executor)
        # An empty batch makes the prefill side map this segment now, not on the first request's clock.
        executor.submit(PrefillBatch(self.engine.storage_spec, []))
