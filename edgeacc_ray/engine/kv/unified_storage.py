"""Semi-PD's unified storage: the weights, the KV page pool and the split's control block, once, in
one shared segment that the decode process owns and the prefill process maps, as Semi-PD does.

`export` moves a loaded model's tensors into a new segment (the process keeps running on the shared
copies); `map_storage` builds the same model in another process from the segment alone, without
reading the checkpoint: it binds a meta-device skeleton to the shared tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgeacc_ray.engine.kv.shared_arena import ArenaManifest, SharedArena
from edgeacc_ray.models.config import ModelArgs
from edgeacc_ray.models.cpu_linears import use_onednn_fp32
from edgeacc_ray.models.loader import model_skeleton, read_model_args
from edgeacc_ray.models.qwen3 import CausalLM

KV_CACHE = "kv_cache"
CONTROL = "control"
CONTROL_SLOTS = 8  # int64 words of the split controller (engine/split/core_split.py)


@dataclass(frozen=True)
class StorageSpec:
    """What a prefill process needs to map the pair's storage. Crosses processes; a few hundred bytes."""

    manifest: ArenaManifest
    model_path: str
    dtype: str  # as the engine was configured ("auto" resolves the same way everywhere)
    onednn_fp32: bool = False  # the decode side's linears run on oneDNN: the prefill side's do too

    @property
    def name(self) -> str:
        return self.manifest.name


@dataclass
class MappedStorage:
    """The model and pool as one process sees them, plus the segment they live in."""

    arena: SharedArena
    model: CausalLM
    args: ModelArgs
    kv_cache: torch.Tensor  # [layers, 2, Hkv, num_pages, page_size, D]
    control: torch.Tensor  # [CONTROL_SLOTS] int64

    def close(self) -> None:
        self.arena.close()


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer once (tied weights under their first name)."""
    tensors = {name: p for name, p in model.named_parameters()}
    tensors.update(model.named_buffers())
    return tensors


def _bind(model: CausalLM, tensors: dict[str, torch.Tensor]) -> None:
    """Make the model's parameters and buffers the given tensors (no copy), re-tying lm_head."""
    for name, tensor in tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[leaf] = tensor
    if model.args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def export(model: CausalLM, kv_shape: tuple[int, ...]) -> MappedStorage:
    """Move `model` (loaded unpacked) into a new segment next to a zeroed KV pool of `kv_shape`."""
    tensors = _model_tensors(model)
    dtype = model.model.embed_tokens.weight.dtype
    specs = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    specs[KV_CACHE] = (kv_shape, dtype)
    specs[CONTROL] = ((CONTROL_SLOTS,), torch.int64)
    arena = SharedArena.create(specs)
    for name, tensor in tensors.items():
        arena.tensors[name].copy_(tensor)
    _bind(model, {name: arena.tensors[name] for name in tensors})
    kv = arena.tensors[KV_CACHE]
    kv.zero_()  # touch every page now (the file is sparse until written)
    return MappedStorage(arena, model, model.args, kv, arena.tensors[CONTROL])


def map_storage(spec: StorageSpec) -> MappedStorage:
    """Map the pair's segment in this process and build the model on it (no weights are read or copied)."""
    args, dtype = read_model_args(spec.model_path, spec.dtype)
    arena = SharedArena.attach(spec.manifest)
    model = model_skeleton(args, dtype)
    tensors = {name: t for name, t in arena.tensors.items() if name not in (KV_CACHE, CONTROL)}
    expected = set(_model_tensors(model))
    if set(tensors) != expected:
        arena.close()
        raise ValueError(f"segment {spec.name} does not hold the tensors of {spec.model_path}")
    _bind(model, tensors)
    use_onednn_fp32(model, args, verdict=spec.onednn_fp32)
    return MappedStorage(arena, model, args, arena.tensors[KV_CACHE], arena.tensors[CONTROL])
