"""Semi-PD's decode deployment: the engine that owns the weights, the KV pool (in a shared segment)
and page allocation, decodes every running request, and sends prompts to the PrefillServer as page
ids and token ids. The Ingress talks to it exactly as to the colocated EngineServer."""
from __future__ import annotations

import concurrent.futures as cf
import logging
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.engine_service import ENGINE_REPLICA_OPTIONS, EngineService
from edgeacc_ray.config import ServeConfig
from edgeacc_ray.engine.prefill_messages import PrefillBatch, PrefillBatchResult, PrefillFailed
from edgeacc_ray.engine.shared_arena import sweep_stale_segments

logger = logging.getLogger("ray.serve")


class RayPrefillExecutor:
    """Runs prefill batches on the PrefillServer deployment. The engine thread submits; a small pool
    of threads waits on the handle calls, so the step loop never blocks on one."""

    def __init__(self, prefill: DeploymentHandle, max_in_flight: int) -> None:
        self._handle = prefill
        self._threads = cf.ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="edgeacc-prefill-call")

    def submit(self, batch: PrefillBatch) -> cf.Future:
        return self._threads.submit(self._call, batch)

    def _call(self, batch: PrefillBatch) -> PrefillBatchResult:
        try:
            return self._handle.prefill.remote(batch).result()
        except Exception as exc:  # the prefill replica died or refused: these requests fail cleanly
            logger.warning("prefill batch of %d requests failed: %s", len(batch.tasks), type(exc).__name__)
            raise PrefillFailed(f"the prefill server failed ({type(exc).__name__}); retry the request") from None


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
