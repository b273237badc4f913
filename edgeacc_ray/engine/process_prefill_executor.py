"""A prefill process for the offline engine and tests: one spawned child running a `PrefillWorker`
(the deployments use a Ray Serve PrefillServer instead). Spawned, not forked: the child must map
the pool and weights from the shared segment, not inherit the parent's copy."""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp

from edgeacc_ray.engine.prefill_messages import PrefillBatch, PrefillBatchResult

_worker = None


def _start(max_num_batched_tokens: int) -> None:
    global _worker
    from edgeacc_ray.engine.platform import configure_cpu
    from edgeacc_ray.engine.prefill_worker import PrefillWorker

    configure_cpu(1)
    _worker = PrefillWorker(max_num_batched_tokens)


def _run(batch: PrefillBatch) -> PrefillBatchResult:
    return _worker.run(batch)


def _pid() -> int:
    import os

    return os.getpid()


class ProcessPrefillExecutor:
    def __init__(self, max_num_batched_tokens: int) -> None:
        self._pool = cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"),
                                            initializer=_start, initargs=(max_num_batched_tokens,))
        self.pid = self._pool.submit(_pid).result()

    def submit(self, batch: PrefillBatch) -> cf.Future:
        return self._pool.submit(_run, batch)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
