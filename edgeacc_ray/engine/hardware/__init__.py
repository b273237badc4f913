"""Where the engine computes: `device` resolves `device` and `attention_backend` once for every
process; `cpu` sets torch threads, the allocator, core pinning and process priority."""

from edgeacc_ray.engine.hardware.cpu import configure_cpu, pin_process, restore_priority, use_cores
from edgeacc_ray.engine.hardware.device import (
    CudaRunnerOptions,
    DevicePlan,
    flashinfer_available,
    resolve_attention,
    resolve_device,
)

__all__ = [
    "CudaRunnerOptions",
    "DevicePlan",
    "configure_cpu",
    "flashinfer_available",
    "pin_process",
    "resolve_attention",
    "resolve_device",
    "restore_priority",
    "use_cores",
]
