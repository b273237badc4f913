"""How the model's linear layers run on a CPU: through oneDNN where it beats torch's default BLAS.

- bf16, on CPUs with native bf16: weights pre-packed for oneDNN once at load time (`PackedLinear`,
  a private copy; 5-50% faster GEMMs on the box it was measured on, bit-identical results).
- float32: oneDNN on the plain weight (`OneDnnLinear`, no copy, so the weights Semi-PD's two
  processes share stay shared), chosen by a measurement at load (`onednn_fp32_is_faster`): on the
  AVX2 EPYC box it ran this model's GEMMs 1.3-2.8x faster than MKL (the lm_head most); on a CPU
  where MKL is as fast, nothing changes. Sums are the same float32 sums in another order, so
  processes that must agree bit for bit (Semi-PD's two) take one verdict: the loader's.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from edgeacc_ray.models.config import ModelArgs
from edgeacc_ray.models.cpu_features import can_pack_bf16

# oneDNN must beat F.linear by this much to be used (the two timings come from one short run).
_MIN_GAIN = 1.15


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, batch_hint: int = 32) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer(
            "packed_weight",
            torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint),
        )
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


class OneDnnLinear(nn.Module):
    """nn.Linear's parameters, under the same names, computed by oneDNN."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and _onednn_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and can_pack_bf16()
    )


@functools.cache
def onednn_fp32_is_faster(in_features: int, out_features: int, threads: int) -> bool:
    """Whether oneDNN runs a float32 [32, in] x [in, out] GEMM clearly faster than F.linear on this
    CPU with `threads` threads (best of a few runs of each, ~50 ms in all)."""
    if not _onednn_available():
        return False
    x, w = torch.randn(32, in_features), torch.randn(out_features, in_features)

    def best(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(3):
                fn()
            times.append(time.perf_counter() - start)
        return min(times)

    blas = best(lambda: F.linear(x, w))
    onednn = best(lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))
    return blas > _MIN_GAIN * onednn


def _replace_linears(module: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, make(child))
        else:
            _replace_linears(child, make)


def pack_linears(module: nn.Module) -> None:
    """Replace every nn.Linear below `module` with a PackedLinear (a separate copy for tied weights)."""
    _replace_linears(module, PackedLinear)


def use_onednn_fp32(model: nn.Module, args: ModelArgs, verdict: bool | None = None) -> bool:
    """Route a float32 CPU model's linears through oneDNN if it measures faster here (the MLP's
    gate/up shape decides), or as `verdict` says (another process measured); the weights are not
    copied. Returns whether it did."""
    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return False
    if verdict is None:
        gate_up = (args.hidden_size, 2 * args.intermediate_size)
        verdict = onednn_fp32_is_faster(*gate_up, torch.get_num_threads())
    if verdict:
        _replace_linears(model, OneDnnLinear)
    return verdict


def runs_on_onednn_fp32(model: nn.Module) -> bool:
    """Whether `use_onednn_fp32` routed this model's linears."""
    return any(isinstance(m, OneDnnLinear) for m in model.modules())
