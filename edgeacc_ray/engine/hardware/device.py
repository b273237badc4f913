"""Where the engine computes and with which attention kernels: the one place `device: auto|cpu|cuda`
and `attention_backend` are resolved, so the engine, the prefill process and the GPU check agree.

CUDA adds nothing the CPU path needs: CPU behaviour (threads, packed linears, the decode workspace)
is decided from the resolved device, never from what is installed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

import torch

Device = Literal["cpu", "cuda"]


class DeviceUnavailable(RuntimeError):
    """`device: cuda` (or `attention_backend: flashinfer`) was asked for on a machine without it."""


def cuda_available() -> bool:
    return torch.cuda.is_available()


def flashinfer_available() -> bool:
    """True when flashinfer can be imported (checked without importing it: its import builds kernels)."""
    return importlib.util.find_spec("flashinfer") is not None


def resolve_device(setting: str, cuda_present: bool | None = None) -> Device:
    """auto -> cuda when torch sees a GPU, else cpu; cuda without a GPU is an error, not a silent CPU run."""
    present = cuda_available() if cuda_present is None else cuda_present
    if setting == "auto":
        return "cuda" if present else "cpu"
    if setting == "cuda" and not present:
        raise DeviceUnavailable(
            "device='cuda' but torch sees no CUDA GPU (torch.cuda.is_available() is False)"
        )
    if setting not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda; got {setting!r}")
    return setting  # type: ignore[return-value]


def resolve_attention(
    setting: str, device: Device, flashinfer_present: bool | None = None
) -> Literal["torch", "flashinfer"]:
    """flashinfer only on CUDA: auto takes it when it imports; asking for it without it is an error."""
    present = flashinfer_available() if flashinfer_present is None else flashinfer_present
    if device != "cuda":
        if setting == "flashinfer":
            raise DeviceUnavailable("attention_backend='flashinfer' needs device='cuda'")
        return "torch"
    if setting == "flashinfer" and not present:
        raise DeviceUnavailable(
            "attention_backend='flashinfer' but flashinfer does not import here"
        )
    if setting == "auto":
        return "flashinfer" if present else "torch"
    return setting  # type: ignore[return-value]


@dataclass(frozen=True)
class DevicePlan:
    """The resolved choices of one engine: its device, attention kernels and whether decode replays
    CUDA graphs (torch path only: flashinfer's plan() runs on the host each step, outside any graph)."""

    device: Device
    attention: Literal["torch", "flashinfer"]
    cuda_graphs: bool

    @classmethod
    def resolve(
        cls,
        device: str,
        attention_backend: str = "auto",
        cuda_graphs: bool = True,
        cuda_present: bool | None = None,
        flashinfer_present: bool | None = None,
    ) -> "DevicePlan":
        dev = resolve_device(device, cuda_present)
        attention = resolve_attention(attention_backend, dev, flashinfer_present)
        return cls(dev, attention, cuda_graphs and dev == "cuda" and attention == "torch")


@dataclass(frozen=True)
class CudaRunnerOptions:
    """What a model runner on CUDA needs beyond the CPU path: its attention kernels and, for decode
    graphs, the largest batch and context to bucket (engine/runner/cuda_graphs.py)."""

    attention: Literal["torch", "flashinfer"]
    cuda_graphs: bool
    max_num_seqs: int
    max_model_len: int
