"""Semi-PD's prefill deployment: a `PrefillWorker` on one compute thread of its own process.

It holds no weights and no pool of its own: each batch names the decode replica's shared segment,
which the worker maps on first sight (again after the decode replica was replaced). On CPU its cores
follow the split the decode side publishes; Ray books it `num_cpus: 0` like every deployment here.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from deployments.engine_service import ENGINE_REPLICA_OPTIONS, restore_priority
from edgeacc_ray.config import ServeConfig
from edgeacc_ray.engine.platform import configure_cpu
from edgeacc_ray.engine.prefill_messages import PrefillBatch, PrefillBatchResult
from edgeacc_ray.engine.prefill_worker import PrefillWorker


@serve.deployment(name="PrefillServer", max_ongoing_requests=16, **ENGINE_REPLICA_OPTIONS)
class PrefillServer:
    def __init__(self, config: dict[str, Any]):
        cfg = ServeConfig.model_validate(config)
        restore_priority()
        # One thread computes every batch, in order: it owns torch's thread count and core pinning.
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeacc-prefill")
        self._compute.submit(configure_cpu, 1).result()
        self.worker = PrefillWorker(cfg.max_num_batched_tokens)

    async def prefill(self, batch: PrefillBatch) -> PrefillBatchResult:
        return await asyncio.get_running_loop().run_in_executor(self._compute, self.worker.run, batch)

    def __del__(self):
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.close()
