"""One shared-memory segment holding named tensors that several processes map (Semi-PD's unified storage).

The owner (the decode side) creates the segment, a file under /dev/shm, lays its tensors out in it and
hands the `ArenaManifest` to a peer, which maps the same file (MAP_SHARED): both see the same bytes,
nothing is copied. Segment names carry the creator's pid, so a segment left behind by a process that
was killed is found and removed by the next owner on the machine (`sweep_stale_segments`).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

SHM_DIR = Path(os.environ.get("EDGEACC_SHM_DIR", "/dev/shm"))
PREFIX = "edgeacc-arena"
_ALIGN = 64  # cache-line aligned tensors

_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.uint8)
}


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives in the segment."""

    offset: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * torch.empty((), dtype=_DTYPES[self.dtype]).element_size()


@dataclass(frozen=True)
class ArenaManifest:
    """What a peer needs to map the segment: its file, its size and the tensors in it. Crosses processes."""

    path: str  # its name carries the creating process's pid (see sweep_stale_segments)
    nbytes: int
    slots: dict[str, TensorSlot]

    @property
    def name(self) -> str:
        return Path(self.path).name


def lay_out(
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]], align: int = _ALIGN
) -> tuple[dict[str, TensorSlot], int]:
    """Place each tensor of `specs` at the next `align`-byte boundary; returns the slots and the total
    size. Shared by this segment and the CUDA arena (engine/kv/cuda_ipc_storage.py)."""
    slots, offset = {}, 0
    for name, (shape, dtype) in specs.items():
        slot = TensorSlot(offset, tuple(int(d) for d in shape), str(dtype).removeprefix("torch."))
        slots[name] = slot
        offset += -(-slot.nbytes // align) * align
    return slots, offset


def slot_view(raw: torch.Tensor, slot: TensorSlot) -> torch.Tensor:
    """The tensor of `slot` inside a flat uint8 buffer (no copy)."""
    return raw[slot.offset : slot.offset + slot.nbytes].view(_DTYPES[slot.dtype]).view(slot.shape)


class SharedArena:
    """A mapping of one segment. `create` makes a new one (this process owns and later unlinks it);
    `attach` maps an existing one by its manifest."""

    def __init__(self, manifest: ArenaManifest, owner: bool) -> None:
        self.manifest = manifest
        self.owner = owner
        self._bytes = torch.from_file(
            manifest.path, shared=True, size=manifest.nbytes, dtype=torch.uint8
        )
        self.tensors = {name: self._view(slot) for name, slot in manifest.slots.items()}

    @classmethod
    def create(cls, specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> "SharedArena":
        """Lay out `specs` (name -> (shape, dtype)) in a new zero-filled segment."""
        slots, offset = lay_out(specs)
        SHM_DIR.mkdir(parents=True, exist_ok=True)
        path = SHM_DIR / f"{PREFIX}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        with open(path, "wb") as f:
            f.truncate(max(offset, 1))
        return cls(ArenaManifest(str(path), max(offset, 1), slots), owner=True)

    @classmethod
    def attach(cls, manifest: ArenaManifest) -> "SharedArena":
        if not os.path.exists(manifest.path):
            raise FileNotFoundError(f"shared segment {manifest.path} is gone (its owner exited)")
        return cls(manifest, owner=False)

    def close(self) -> None:
        """Drop this mapping; the owner also removes the segment (peers keep theirs until they close)."""
        self.tensors.clear()
        self._bytes = None
        if self.owner:
            try:
                os.unlink(self.manifest.path)
            except FileNotFoundError:
                pass

    def _view(self, slot: TensorSlot) -> torch.Tensor:
        return slot_view(self._bytes, slot)


def sweep_stale_segments() -> list[str]:
    """Remove segments whose creating process no longer exists; returns the removed paths."""
    removed = []
    for path in SHM_DIR.glob(f"{PREFIX}-*"):
        try:
            pid = int(path.name.split("-")[2])
        except (IndexError, ValueError):
            continue
        if not process_alive(pid):
            try:
                path.unlink()
                removed.append(str(path))
            except FileNotFoundError:
                pass
    return removed


def process_alive(pid: int) -> bool:
    """Does process `pid` exist on this node?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
