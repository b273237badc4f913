"""The decode side's Semi-PD storage and split, on either device: the CPU builds a /dev/shm segment
and splits cores (unified_storage.py, core_split.py); CUDA builds a device arena shared over IPC and
splits SMs (cuda_ipc_storage.py, sm_split.py). Both publish through the same ControlBlock and are
driven by the same SplitController, so the engine's step loop does not know which it runs on."""

from __future__ import annotations

import os
from dataclasses import dataclass

from edgeacc_ray.config import SemiPDConfig
from edgeacc_ray.engine.kv import MappedStorage, StorageSpec, export
from edgeacc_ray.engine.split import ControlBlock, CoreSplitFollower, SplitController
from edgeacc_ray.models.cpu_linears import runs_on_onednn_fp32
from edgeacc_ray.models.qwen3 import CausalLM


@dataclass
class SemiPDParts:
    storage: (
        object  # MappedStorage (CPU) or CudaMappedStorage: model, args, kv_cache, control, close()
    )
    spec: object  # StorageSpec or CudaStorageSpec: what the prefill process maps
    split: SplitController  # over cores (CPU) or SM units (CUDA)
    control: ControlBlock
    follower: object  # CoreSplitFollower or SmSplitFollower: sync(), cores
    initial_cores: list[int] | None  # CPU: this process's affinity, restored on close


def start_semi_pd(
    model: CausalLM,
    kv_shape: tuple[int, ...],
    model_path: str,
    dtype: str,
    semi_pd: SemiPDConfig,
    device: str,
    live_decode_split: bool = True,
) -> SemiPDParts:
    """Move the model and a pool of `kv_shape` into shared storage and start the decode side's split.
    `live_decode_split=False` keeps the decode process at its start SM share (CUDA graphs)."""
    if device == "cuda":
        from edgeacc_ray.engine.kv import export_cuda
        from edgeacc_ray.engine.split import SM_UNITS, start_follower

        storage = export_cuda(model, kv_shape)
        control = ControlBlock(storage.control)
        split = SplitController(
            tuple(range(SM_UNITS)),
            semi_pd.ttft_slo_ms,
            semi_pd.tpot_slo_ms,
            lend_idle_cores=semi_pd.lend_idle_cores,
        )
        follower = start_follower(
            control, "decode", storage.kv_cache.device.index or 0, live=live_decode_split
        )
        return SemiPDParts(storage, storage.spec(model_path, dtype), split, control, follower, None)
    storage: MappedStorage = export(model, kv_shape)
    control = ControlBlock(storage.control)
    cores = semi_pd.cores or tuple(sorted(os.sched_getaffinity(0)))
    split = SplitController(
        cores, semi_pd.ttft_slo_ms, semi_pd.tpot_slo_ms, lend_idle_cores=semi_pd.lend_idle_cores
    )
    return SemiPDParts(
        storage,
        StorageSpec(storage.arena.manifest, model_path, dtype, runs_on_onednn_fp32(model)),
        split,
        control,
        CoreSplitFollower(control, "decode"),
        sorted(os.sched_getaffinity(0)),
    )
