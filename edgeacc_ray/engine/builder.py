"""Builds an engine's parts from its config: the model (sharded under tensor parallelism, in shared
storage under Semi-PD), the page pool and its block manager, the KV tier, the admission and queue
policies and the scheduler. `LLMEngine` only runs them; what depends on what is decided here, once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeacc_ray.config import EngineConfig
from edgeacc_ray.engine.hardware import CudaRunnerOptions, DevicePlan, configure_cpu
from edgeacc_ray.engine.kv import BlockManager
from edgeacc_ray.engine.request import RequestLimits
from edgeacc_ray.engine.runner import ModelRunner, kv_page_bytes, kv_pool_shape
from edgeacc_ray.engine.scheduling import (
    AdmissionPolicy,
    QueueBounds,
    RunningBound,
    Scheduler,
    StepTime,
)
from edgeacc_ray.engine.semi_pd import (
    DecodeSide,
    PrefillDispatcher,
    PrefillExecutor,
    start_semi_pd,
)
from edgeacc_ray.engine.tp import (
    Rank0Model,
    TensorParallelRanks,
    WorkerSpec,
    new_group_name,
    node_address,
)
from edgeacc_ray.models.loader import load_model
from edgeacc_ray.models.tp_shard import TPShard

if TYPE_CHECKING:
    from edgeacc_ray.engine.kv import KVTier

MAX_DEFAULT_CONTEXT = 32768


@dataclass
class EngineParts:
    plan: DevicePlan
    device: str
    model_path: Path
    tokenizer: Any
    args: Any  # ModelArgs; under tensor parallelism, this rank's shard
    dtype: Any  # torch.dtype of the weights
    max_model_len: int
    limits: RequestLimits
    runner: ModelRunner
    block_manager: BlockManager
    tier: KVTier | None
    running_bound: RunningBound
    queue_bounds: QueueBounds
    step_time: StepTime
    scheduler: Scheduler
    eos_token_ids: set[int]
    tp_ranks: TensorParallelRanks | None = None
    decode_side: DecodeSide | None = None  # Semi-PD's end in this engine


def build_parts(
    config: EngineConfig, prefill_executor: PrefillExecutor | None = None
) -> EngineParts:
    from transformers import AutoTokenizer

    from edgeacc_ray.models.builtin_models import resolve_model

    if (
        config.enable_hierarchical_cache
    ):  # imported here: the tier brings Ray, the engine alone does not need it
        from edgeacc_ray.engine.kv import require_ray

        require_ray()  # before the model loads
    semi_pd = config.semi_pd
    if semi_pd is not None and prefill_executor is None:
        raise ValueError("semi_pd needs a prefill executor")
    plan = DevicePlan.resolve(config.device, config.attention_backend, config.cuda_graphs)
    device = plan.device
    if device == "cpu":
        configure_cpu(config.compute_threads)
    model_path = resolve_model(config.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tp_size = config.tensor_parallel_size
    # Under tensor parallelism args is this rank's shard: H/tp heads, Hkv/tp KV heads per layer.
    model, args = load_model(
        model_path,
        config.dtype,
        device,
        pack=semi_pd is None,
        shard=TPShard(0, tp_size) if tp_size > 1 else None,
    )
    dtype = model.model.embed_tokens.weight.dtype
    page_bytes = kv_page_bytes(args, config.page_size, dtype)
    num_pages = config.num_pages or int(config.kv_cache_memory_gb * 2**30 // page_bytes)
    if num_pages < 2:
        raise ValueError(
            f"kv_cache_memory_gb={config.kv_cache_memory_gb} holds fewer than 2 pages "
            f"of {page_bytes} bytes"
        )
    max_model_len = min(
        config.max_model_len or min(args.max_position_embeddings, MAX_DEFAULT_CONTEXT),
        num_pages * config.page_size,
    )
    limits = RequestLimits(
        max_model_len, args.vocab_size, config.max_logprobs, num_pages * config.page_size
    )
    # The decode workspace's rows are this process's bookkeeping, which the other ranks do not see.
    workspace_gb = config.decode_workspace_memory_gb
    workspace_bytes = (
        int(workspace_gb * 2**30) if workspace_gb is not None else 2 * num_pages * page_bytes
    )
    if device != "cpu" or tp_size > 1:
        workspace_bytes = 0
    # CUDA: decode graphs only on one rank (a graph cannot hold the ranks' collectives here).
    cuda = (
        CudaRunnerOptions(
            plan.attention, plan.cuda_graphs and tp_size == 1, config.max_num_seqs, max_model_len
        )
        if device == "cuda"
        else None
    )
    scratch_pages = (
        1 if cuda is not None and cuda.cuda_graphs else 0
    )  # the graphs' padding rows write there
    decode_side: DecodeSide | None = None
    if semi_pd is not None:  # CPU: a /dev/shm segment and a core split; CUDA: IPC and an SM split
        parts = start_semi_pd(
            model,
            kv_pool_shape(args, num_pages + scratch_pages, config.page_size),
            str(model_path),
            config.dtype,
            semi_pd,
            device,
            live_decode_split=scratch_pages == 0,
        )
        dispatcher = PrefillDispatcher(
            parts.spec,
            prefill_executor,
            semi_pd.prefill_batch_tokens,
            semi_pd.max_prefill_batches_in_flight,
        )
        decode_side = DecodeSide(parts, dispatcher)
    kv_cache = decode_side.storage.kv_cache if decode_side is not None else None
    tp_ranks: TensorParallelRanks | None = None
    if tp_size > 1:
        tp_ranks = TensorParallelRanks.start(
            model,
            WorkerSpec(
                str(model_path),
                config.dtype,
                device,
                config.compute_threads,
                num_pages,
                config.page_size,
                rank=0,
                world_size=tp_size,
                store_host=node_address(),
                store_port=0,
                group_name=new_group_name(),
                timeout_s=config.tensor_parallel_timeout_s,
            ),
        )
        model = Rank0Model(model, tp_ranks)
    runner = ModelRunner(model, args, num_pages, config.page_size, workspace_bytes, kv_cache, cuda)
    block_manager = BlockManager(
        num_pages,
        config.page_size,
        config.enable_prefix_caching,
        record_reused_pages=config.enable_hierarchical_cache,
    )
    tier: KVTier | None = None
    if config.enable_hierarchical_cache:
        from edgeacc_ray.engine.kv import KVTier

        tier = KVTier.connect(
            model_path,
            int(config.kv_cache_offload_memory_gb * 2**30),
            block_manager,
            runner.kv_cache,
            config.kv_store_name,
        )
    running_bound = RunningBound(config.max_num_seqs, config.tpot_slo_ms)
    admission = AdmissionPolicy(
        config.page_size,
        max_model_len,
        running_bound,
        config.new_token_ratio_init,
        config.new_token_ratio_min,
        config.reservation_clip_tokens,
    )
    queue_bounds = QueueBounds(
        config.max_queued_requests, config.max_queue_wait_s, config.queue_timeout_s
    )
    step_time = StepTime(config.tpot_slo_ms)  # for the queue's forecast
    scheduler = Scheduler(
        block_manager,
        admission,
        config.max_num_batched_tokens,
        remote_prefill=semi_pd is not None,
        tier=tier,
    )
    return EngineParts(
        plan=plan,
        device=device,
        model_path=model_path,
        tokenizer=tokenizer,
        args=args,
        dtype=dtype,
        max_model_len=max_model_len,
        limits=limits,
        runner=runner,
        block_manager=block_manager,
        tier=tier,
        running_bound=running_bound,
        queue_bounds=queue_bounds,
        step_time=step_time,
        scheduler=scheduler,
        eos_token_ids=_eos_token_ids(model_path, tokenizer),
        tp_ranks=tp_ranks,
        decode_side=decode_side,
    )


def _eos_token_ids(model_path: Path, tokenizer: Any) -> set[int]:
    from transformers import GenerationConfig

    ids: set[int] = set()
    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except OSError:
        pass
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
