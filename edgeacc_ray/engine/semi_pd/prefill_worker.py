"""The prefill side of Semi-PD: computes prompts' KV straight into pages of the shared pool that the
decode side granted, and samples each prompt's first token. It owns nothing: the weights, the pool
and the page allocation belong to the decode process, whose segment (CPU) or device arena (CUDA IPC)
it maps on first sight (and maps again when the decode process was replaced and sends a new one)."""

from __future__ import annotations

import os
import time

import torch

from edgeacc_ray.engine.hardware import CudaRunnerOptions, resolve_attention
from edgeacc_ray.engine.kv import (
    CudaMappedStorage,
    CudaStorageSpec,
    MappedStorage,
    StorageSpec,
    map_cuda_storage,
    map_storage,
)
from edgeacc_ray.engine.request import Sequence
from edgeacc_ray.engine.runner import ModelRunner
from edgeacc_ray.engine.sampling import sample
from edgeacc_ray.engine.scheduling import ScheduledBatch
from edgeacc_ray.engine.semi_pd.prefill_messages import (
    PrefillBatch,
    PrefillBatchResult,
    PrefillResult,
    PrefillTask,
    StorageProbe,
)
from edgeacc_ray.engine.split import (
    ControlBlock,
    CoreSplitFollower,
    SmSplitFollower,
    SmSplitReport,
    start_follower,
)


class PrefillWorker:
    def __init__(self, max_num_batched_tokens: int = 2048) -> None:
        self.max_num_batched_tokens = max_num_batched_tokens
        self.storage: MappedStorage | CudaMappedStorage | None = None
        self.storage_name: str | None = None
        self.runner: ModelRunner | None = None
        self.follower: CoreSplitFollower | SmSplitFollower | None = None

    def run(self, batch: PrefillBatch) -> PrefillBatchResult:
        """Fill every task's pages, chunk by chunk under the token budget; one first token per task."""
        self._map(batch.storage)
        start = time.perf_counter()
        pending = [_sequence(task) for task in batch.tasks]
        results: list[PrefillResult] = []
        while pending:
            self.follower.sync()  # between chunks: the cores may have moved
            items, budget = [], self.max_num_batched_tokens
            for seq in pending:
                if budget == 0:
                    break
                n = min(seq.num_uncomputed_tokens, budget)
                items.append((seq, n))
                budget -= n
            logits, samplers = self.runner.run(ScheduledBatch(items=items, num_decode=0))
            for seq, n in items:
                seq.num_computed_tokens += n
            if samplers:
                tokens, logprobs = sample(logits, samplers)
                for seq, token, logprob in zip(samplers, tokens, logprobs):
                    state = seq.generator.get_state() if seq.generator is not None else None
                    results.append(
                        PrefillResult(seq.request_id, token, logprob, state, seq.prompt_logprobs)
                    )
            pending = [seq for seq in pending if seq.num_uncomputed_tokens > 0]
        return PrefillBatchResult(results, time.perf_counter() - start)

    def close(self) -> None:
        if self.storage is not None:
            self.storage.close()
        self.storage = self.runner = self.follower = None
        self.storage_name = None

    def probe(self, pages: list[int]) -> StorageProbe:
        """This process's view of the mapped storage (see StorageProbe); nothing mapped: zeros."""
        kv = self.storage.kv_cache if self.storage is not None else None
        on_cuda = kv is not None and kv.is_cuda
        sums = page_sums(kv, pages) if kv is not None else []
        return StorageProbe(
            pid=os.getpid(),
            storage_name=self.storage_name,
            kv_cache_ptr=kv.data_ptr() if kv is not None else 0,
            weight_ptr=self.storage.model.model.embed_tokens.weight.data_ptr()
            if kv is not None
            else 0,
            device=str(kv.device) if kv is not None else "none",
            own_allocated_bytes=torch.cuda.memory_allocated(kv.device) if on_cuda else 0,
            page_sums=sums,
        )

    def split_report(self) -> SmSplitReport | None:
        """The SM split as this process applies it (CUDA storage only)."""
        return self.follower.report() if isinstance(self.follower, SmSplitFollower) else None

    def _map(self, spec: StorageSpec | CudaStorageSpec) -> None:
        if spec.name == self.storage_name:
            return
        self.close()
        if isinstance(spec, CudaStorageSpec):  # the decode process's device arena, over CUDA IPC
            storage = map_cuda_storage(spec)
            num_pages, page_size = storage.kv_cache.shape[3], storage.kv_cache.shape[4]
            cuda = CudaRunnerOptions(
                resolve_attention("auto", "cuda"), False, 1, num_pages * page_size
            )
            self.runner = ModelRunner(
                storage.model,
                storage.args,
                num_pages,
                page_size,
                kv_cache=storage.kv_cache,
                cuda=cuda,
            )
            self.follower = start_follower(
                ControlBlock(storage.control), "prefill", storage.kv_cache.device.index or 0
            )
        else:
            storage = map_storage(spec)
            num_pages, page_size = storage.kv_cache.shape[3], storage.kv_cache.shape[4]
            self.runner = ModelRunner(
                storage.model, storage.args, num_pages, page_size, kv_cache=storage.kv_cache
            )
            self.follower = CoreSplitFollower(ControlBlock(storage.control), "prefill")
        self.storage, self.storage_name = storage, spec.name


def _sequence(task: PrefillTask) -> Sequence:
    seq = Sequence(
        task.request_id, task.token_ids[: task.num_prompt_tokens], task.params, arrival_time=0.0
    )
    seq.token_ids = list(task.token_ids)
    seq.page_table = list(task.page_table)
    seq.num_computed_tokens = task.num_computed_tokens
    seq.grammar_mask, seq.eos_token_ids = task.grammar_mask, task.eos_token_ids
    if task.params.prompt_logprobs is not None:  # score from where the decode side's entries end
        seq.prompt_logprobs_base = task.next_prompt_logprob or seq.num_prompt_tokens
        seq.prompt_logprobs = []
    if task.generator_state is not None:
        seq.generator.set_state(task.generator_state)
    return seq


def page_sums(kv_cache: torch.Tensor, pages: list[int]) -> list[float]:
    """Sum of |KV| of each page across layers, in float64 on the host: equal bytes give equal sums in
    any process, whatever kernels or SM share it runs with."""
    return [float(kv_cache[:, :, :, page].cpu().double().abs().sum()) for page in pages]
