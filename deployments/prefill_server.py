"""Semi-PD's prefill deployment: a `PrefillWorker` on one compute thread of its own process.

It holds no weights and no pool of its own: each batch names the decode replica's shared segment,
which the worker maps on first sight (again after the decode replica was replaced). On CPU its cores
follow the split the decode side publishes; Ray books it `num_cpus: 0` like every deployment here.

With several pairs, each prefill replica serves one decode replica: the decode side claims a replica
(`claim`, refused while another live decode process holds it) and pins every batch to it, so a prefill
process maps one segment and follows one split instead of remapping between pools.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from deployments.engine_service import ENGINE_REPLICA_OPTIONS, check_pin, own_replica_id
from edgeacc_ray.config import ServeConfig
from edgeacc_ray.engine.hardware import configure_cpu, restore_priority
from edgeacc_ray.engine.kv import process_alive
from edgeacc_ray.engine.semi_pd import (
    PrefillBatch,
    PrefillBatchResult,
    PrefillReplicaTaken,
    PrefillWorker,
)


class PairClaim:
    """Which decode process a prefill replica serves: the first to claim it, until that process is gone
    (same node: the pair shares memory, so its pid can be checked here)."""

    def __init__(self) -> None:
        self.decode_pid: int | None = None

    def take(self, decode_pid: int) -> None:
        if self.decode_pid not in (None, decode_pid) and process_alive(self.decode_pid):
            raise PrefillReplicaTaken(f"this prefill replica serves decode pid {self.decode_pid}")
        self.decode_pid = decode_pid


@serve.deployment(name="PrefillServer", max_ongoing_requests=16, **ENGINE_REPLICA_OPTIONS)
class PrefillServer:
    def __init__(self, config: dict[str, Any]):
        cfg = ServeConfig.model_validate(config)
        restore_priority()
        # One thread computes every batch, in order: it owns torch's thread count and core pinning.
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeacc-prefill")
        self._compute.submit(configure_cpu, 1).result()
        self.worker = PrefillWorker(cfg.max_num_batched_tokens)
        self.replica_id = own_replica_id()
        self.pair = PairClaim()

    def claim(self, decode_pid: int) -> str:
        """Serve the decode process `decode_pid` from now on; returns this replica's id to pin batches with."""
        self.pair.take(decode_pid)
        return self.replica_id

    async def prefill(self, batch: PrefillBatch, replica: str | None = None) -> PrefillBatchResult:
        check_pin(replica, self.replica_id)
        return await asyncio.get_running_loop().run_in_executor(
            self._compute, self.worker.run, batch
        )

    def __del__(self):
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.close()
