"""What this CPU computes natively, read from /proc/cpuinfo: which dtype `auto` picks on the CPU and
whether oneDNN can pre-pack bf16 weights. Without native bf16 (AVX2-only x86, for example) torch
converts every bf16 GEMM element by element: measured on an AVX2 EPYC, one thread, 64 x 576 x 1536,
bf16 ran at 9 GFLOP/s against fp32's 78, so there the model runs in float32."""

from __future__ import annotations

import functools
import platform

# Native bf16 multiply: AVX512-BF16 or AMX on x86, the BF16 extension on Arm.
BF16_COMPUTE_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
# oneDNN's bf16 weight reorder (`mkldnn._reorder_linear_weight`) refuses to run without these.
BF16_PACK_FLAG_SETS = (
    frozenset({"avx512bw", "avx512vl", "avx512dq"}),
    frozenset({"avx_ne_convert"}),
)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The feature flags of the first CPU listed (x86 `flags`, Arm `Features`); empty if unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    return bool(BF16_COMPUTE_FLAGS & (cpu_flags() if flags is None else flags))


def can_pack_bf16(flags: frozenset[str] | None = None) -> bool:
    """oneDNN can pre-pack bf16 linears here (on x86 it needs AVX512 BW/VL/DQ or AVX-NE-CONVERT)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    flags = cpu_flags() if flags is None else flags
    return any(needed <= flags for needed in BF16_PACK_FLAG_SETS)
