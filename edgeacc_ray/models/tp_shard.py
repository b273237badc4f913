"""Tensor-parallel sharding of the decoder (Megatron style), one rank's slice of every layer.

Attention is split by head: rank r holds q heads [r*H/tp, (r+1)*H/tp) and the KV heads they read,
[r*Hkv/tp, (r+1)*Hkv/tp) (GQA groups never straddle ranks), so q/k/v are column-parallel and its KV
pool holds only its own KV heads; o_proj is row-parallel (its input columns are those heads). The MLP
is split the same way: gate/up column-parallel over the intermediate size, down_proj row-parallel.
A row-parallel layer's output is a partial sum, all-reduced over the ranks (`AllReduced`).

The embedding, lm_head and the norms stay replicated on every rank: they are a small share of a
model's weights, and replicating them keeps the step free of any collective besides the two
all-reduces per layer (the embedding needs no gather, and rank 0 alone computes logits).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from edgeacc_ray.models.config import ModelArgs

_COLUMN = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(weight|bias)$")  # split dim 0
_ROW = re.compile(r"\.(o_proj|down_proj)\.weight$")  # split dim 1 (input features)


class ShardingError(ValueError):
    """The model cannot be split over `tensor_parallel_size` ranks; `field` is the setting at fault."""

    def __init__(self, message: str, field: str = "tensor_parallel_size") -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self):
        return type(self), (str(self), self.field)


def check_shardable(args: ModelArgs, tp: int) -> None:
    """Raise ShardingError unless heads, KV heads and the MLP width all divide by `tp`."""
    sizes = {
        "num_key_value_heads": args.num_kv_heads,
        "num_attention_heads": args.num_heads,
        "intermediate_size": args.intermediate_size,
    }
    bad = [f"{name}={value}" for name, value in sizes.items() if value % tp]
    if bad:
        raise ShardingError(
            f"tensor_parallel_size={tp} must divide the model's {', '.join(bad)} "
            f"(each rank holds whole KV heads); use a divisor of {args.num_kv_heads}"
        )


@dataclass(frozen=True)
class TPShard:
    """Which slice of the model this process holds."""

    rank: int
    world_size: int

    def local_args(self, args: ModelArgs) -> ModelArgs:
        """The shape of this rank's layers: H/tp heads, Hkv/tp KV heads, intermediate/tp columns."""
        check_shardable(args, self.world_size)
        tp = self.world_size
        return dataclasses.replace(
            args,
            num_heads=args.num_heads // tp,
            num_kv_heads=args.num_kv_heads // tp,
            intermediate_size=args.intermediate_size // tp,
        )

    def index(self, name: str, shape: Sequence[int]) -> tuple[slice, ...] | None:
        """The index of this rank's part of checkpoint tensor `name` (HF naming, of `shape`), for
        reading just that part from the file; None for a replicated tensor. Rows of q/k/v are
        head-major, so equal chunks are whole heads."""
        dim = 0 if _COLUMN.search(name) else 1 if _ROW.search(name) else None
        if dim is None:
            return None
        size = shape[dim] // self.world_size
        part = slice(self.rank * size, (self.rank + 1) * size)
        return (part,) if dim == 0 else (slice(None), part)


class AllReduced(nn.Module):
    """A row-parallel layer whose output is summed over the ranks (in place, by `all_reduce`).
    The sum is returned in float32: it is added to the float32 residual stream anyway, and summing
    the ranks' partials in float32 keeps bf16 from rounding a second time."""

    def __init__(self, inner: nn.Module, all_reduce: Callable[[torch.Tensor], None]) -> None:
        super().__init__()
        self.inner = inner
        self.all_reduce = all_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x).float()  # [T, hidden]: this rank's partial sum
        self.all_reduce(out)
        return out


def wrap_row_parallel(model: nn.Module, all_reduce: Callable[[torch.Tensor], None]) -> None:
    """Make every layer's o_proj and down_proj all-reduce its output (after loading and packing)."""
    for layer in model.model.layers:
        layer.self_attn.o_proj = AllReduced(layer.self_attn.o_proj, all_reduce)
        layer.mlp.down_proj = AllReduced(layer.mlp.down_proj, all_reduce)
