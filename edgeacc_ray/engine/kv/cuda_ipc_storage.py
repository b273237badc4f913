"""Semi-PD's unified storage on CUDA: the weights and the KV page pool in one device allocation that
the decode process owns and the prefill process maps through CUDA IPC (`_share_cuda_` +
`cudaIpcOpenMemHandle`, as Semi-PD does), mirroring unified_storage.py's shared-memory segment on CPU.

One allocation, one handle: the tensors are laid out in a single uint8 buffer (shared_arena.lay_out,
256-byte aligned), so the peer opens one IPC handle and views every tensor inside it. The split's
control block stays in a small /dev/shm segment: both processes read it every step, and a host word
costs nothing to read where a device word would synchronize the stream.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import torch

from edgeacc_ray.engine.kv.shared_arena import (
    ArenaManifest,
    SharedArena,
    TensorSlot,
    lay_out,
    slot_view,
)
from edgeacc_ray.engine.kv.unified_storage import (
    CONTROL,
    CONTROL_SLOTS,
    KV_CACHE,
    _bind,
    _model_tensors,
)
from edgeacc_ray.models.config import ModelArgs
from edgeacc_ray.models.loader import model_skeleton, read_model_args
from edgeacc_ray.models.qwen3 import CausalLM

CUDA_ALIGN = 256  # cudaMalloc's own alignment: every tensor starts where a fresh allocation would


class CudaIpcUnavailable(RuntimeError):
    """The storage cannot be exported or mapped over CUDA IPC here (no CUDA, or the handle is stale)."""


@dataclass(frozen=True)
class CudaIpcHandle:
    """One CUDA allocation as `UntypedStorage._share_cuda_()` exports it: the cudaIpcMemHandle, where the
    storage sits in the allocation, the producer's reference counter (so the owner's allocator does not
    reuse the block while a peer maps it) and the event that orders the peer after the owner's writes.
    Crosses processes (plain bytes and ints, a few hundred bytes pickled)."""

    device: int
    handle: bytes
    size_bytes: int
    offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool

    @classmethod
    def export(cls, storage: torch.UntypedStorage) -> "CudaIpcHandle":
        if storage.device.type != "cuda":
            raise CudaIpcUnavailable(f"only CUDA storage has an IPC handle, not {storage.device}")
        (
            device,
            handle,
            size_bytes,
            offset_bytes,
            ref_handle,
            ref_offset,
            event_handle,
            event_sync,
        ) = storage._share_cuda_()
        return cls(
            int(device),
            bytes(handle),
            int(size_bytes),
            int(offset_bytes),
            bytes(ref_handle),
            int(ref_offset),
            bytes(event_handle) if event_handle else b"",
            bool(event_sync),
        )

    def open(self) -> torch.UntypedStorage:
        """Map the allocation in this process (cudaIpcOpenMemHandle); the owner's bytes, not a copy."""
        if not torch.cuda.is_available():
            raise CudaIpcUnavailable("this process sees no CUDA device to map the handle on")
        torch.cuda._lazy_init()
        return torch.UntypedStorage._new_shared_cuda(
            self.device,
            self.handle,
            self.size_bytes,
            self.offset_bytes,
            self.ref_counter_handle,
            self.ref_counter_offset,
            self.event_handle or None,
            self.event_sync_required,
        )


@dataclass(frozen=True)
class CudaArenaManifest:
    """What a peer needs to map the CUDA arena: its handle and the tensors in it. Crosses processes."""

    name: str  # carries the owner's pid, like the shm segments
    handle: CudaIpcHandle
    nbytes: int
    slots: dict[str, TensorSlot]


class CudaArena:
    """One device buffer holding named tensors. `create` allocates it (this process owns it);
    `attach` maps an owner's buffer by its manifest."""

    def __init__(self, manifest: CudaArenaManifest, buffer: torch.Tensor, owner: bool) -> None:
        self.manifest = manifest
        self.owner = owner
        self.buffer = buffer  # uint8 [nbytes] on the device
        self.tensors = {name: slot_view(buffer, slot) for name, slot in manifest.slots.items()}

    @classmethod
    def create(
        cls, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], device: torch.device | str
    ) -> "CudaArena":
        slots, nbytes = lay_out(specs, CUDA_ALIGN)
        buffer = torch.zeros(max(nbytes, 1), dtype=torch.uint8, device=device)
        torch.cuda.synchronize(buffer.device)  # the zeros land before any peer maps the buffer
        handle = CudaIpcHandle.export(buffer.untyped_storage())
        name = f"edgeacc-cuda-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        return cls(CudaArenaManifest(name, handle, max(nbytes, 1), slots), buffer, owner=True)

    @classmethod
    def attach(cls, manifest: CudaArenaManifest) -> "CudaArena":
        storage = manifest.handle.open()
        device = torch.device("cuda", manifest.handle.device)
        raw = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)
        if raw.numel() < manifest.nbytes:
            raise CudaIpcUnavailable(
                f"{manifest.name}: mapped {raw.numel()} bytes, expected {manifest.nbytes}"
            )
        return cls(manifest, raw[: manifest.nbytes], owner=False)

    def close(self) -> None:
        """Drop this process's views (a peer's drop closes its IPC mapping; the owner's frees the
        buffer once no peer holds it: the producer-side reference counter sees to that)."""
        self.tensors.clear()
        self.buffer = None


@dataclass(frozen=True)
class CudaStorageSpec:
    """What a prefill process needs to map the pair's CUDA storage (the CUDA form of StorageSpec)."""

    arena: CudaArenaManifest
    control: ArenaManifest  # the split's control block, in host shared memory
    model_path: str
    dtype: str

    @property
    def name(self) -> str:
        return self.arena.name


@dataclass
class CudaMappedStorage:
    """The model and pool on the device as one process sees them (MappedStorage's CUDA form)."""

    arena: CudaArena
    control_arena: SharedArena
    model: CausalLM
    args: ModelArgs
    kv_cache: torch.Tensor  # [layers, 2, Hkv, num_pages, page_size, D] on the device
    control: torch.Tensor  # [CONTROL_SLOTS] int64, host shared memory

    def spec(self, model_path: str, dtype: str) -> CudaStorageSpec:
        return CudaStorageSpec(self.arena.manifest, self.control_arena.manifest, model_path, dtype)

    def close(self) -> None:
        self.arena.close()
        self.control_arena.close()


def export_cuda(model: CausalLM, kv_shape: tuple[int, ...]) -> CudaMappedStorage:
    """Move `model` (on a CUDA device, loaded unpacked) into a new device arena next to a zeroed KV pool
    of `kv_shape`; the model keeps running on the arena's tensors (the originals are freed)."""
    tensors = _model_tensors(model)
    device = model.model.embed_tokens.weight.device
    if device.type != "cuda":
        raise CudaIpcUnavailable(f"export_cuda needs the model on a CUDA device, not {device}")
    dtype = model.model.embed_tokens.weight.dtype
    specs = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    specs[KV_CACHE] = (kv_shape, dtype)
    arena = CudaArena.create(specs, device)
    for name, tensor in tensors.items():
        arena.tensors[name].copy_(tensor)
    _bind(model, {name: arena.tensors[name] for name in tensors})
    torch.cuda.synchronize(device)
    control_arena = SharedArena.create({CONTROL: ((CONTROL_SLOTS,), torch.int64)})
    return CudaMappedStorage(
        arena,
        control_arena,
        model,
        model.args,
        arena.tensors[KV_CACHE],
        control_arena.tensors[CONTROL],
    )


def map_cuda_storage(spec: CudaStorageSpec) -> CudaMappedStorage:
    """Map the owner's device arena here and build the model on it: no weight is read or copied."""
    args, dtype = read_model_args(spec.model_path, spec.dtype, "cuda")
    arena = CudaArena.attach(spec.arena)
    model = model_skeleton(args, dtype)
    tensors = {name: t for name, t in arena.tensors.items() if name != KV_CACHE}
    if set(tensors) != set(_model_tensors(model)):
        arena.close()
        raise ValueError(f"arena {spec.name} does not hold the tensors of {spec.model_path}")
    _bind(model, tensors)
    control_arena = SharedArena.attach(spec.control)
    return CudaMappedStorage(
        arena, control_arena, model, args, arena.tensors[KV_CACHE], control_arena.tensors[CONTROL]
    )
