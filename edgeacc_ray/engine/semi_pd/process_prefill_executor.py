"""A prefill process for the offline engine and tests: one spawned child running a `PrefillWorker`
(the deployments use a Ray Serve PrefillServer instead). Spawned, not forked: the child must map
the pool and weights from the shared segment, not inherit the parent's copy."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp

from edgeacc_ray.engine.semi_pd.prefill_messages import PrefillBatch, PrefillBatchResult

_worker = None


def _start(max_num_batched_tokens: int, mps_share: int | None) -> None:
    global _worker
    if mps_share is not None:  # before anything starts CUDA in this child: MPS reads it once
        from edgeacc_ray.engine.split import set_mps_share

        set_mps_share(mps_share)
    from edgeacc_ray.engine.hardware import configure_cpu
    from edgeacc_ray.engine.semi_pd.prefill_worker import PrefillWorker

    configure_cpu(1)
    _worker = PrefillWorker(max_num_batched_tokens)


def _run(batch: PrefillBatch) -> PrefillBatchResult:
    return _worker.run(batch)


def _split_report():
    return _worker.split_report()


def _probe(pages: list[int]):
    return _worker.probe(pages)


def _pid() -> int:
    import os

    return os.getpid()


class ProcessPrefillExecutor:
    def __init__(self, max_num_batched_tokens: int, mps_share: int | None = None) -> None:
        """`mps_share`: the child's CUDA_MPS_ACTIVE_THREAD_PERCENTAGE (CUDA Semi-PD), set before CUDA starts."""
        self._pool = cf.ProcessPoolExecutor(
            max_workers=1,
            mp_context=mp.get_context("spawn"),
            initializer=_start,
            initargs=(max_num_batched_tokens, mps_share),
        )
        self.pid = self._pool.submit(_pid).result()

    def submit(self, batch: PrefillBatch) -> cf.Future:
        return self._pool.submit(_run, batch)

    def split_report(self):
        """The child's SmSplitReport (CUDA storage mapped), or None (CPU, or nothing mapped yet)."""
        return self._pool.submit(_split_report).result()

    def probe(self, pages: list[int]):
        """The child's StorageProbe: its view of the mapped storage and the KV sums of `pages`."""
        return self._pool.submit(_probe, pages).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
