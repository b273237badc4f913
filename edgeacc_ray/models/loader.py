"""Load an HF checkpoint folder (safetensors, sharded or not) into the native model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from edgeacc_ray.models.config import ModelArgs
from edgeacc_ray.models.cpu_features import has_native_bf16
from edgeacc_ray.models.cpu_linears import can_pack, pack_linears, use_onednn_fp32
from edgeacc_ray.models.qwen3 import CausalLM
from edgeacc_ray.models.tp_shard import TPShard

DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}

# HF names that are slices of one fused native weight: (fused name, slice index)
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_FUSED_NAME = re.compile(r"^(.*)\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(weight|bias)$")


def resolve_dtype(
    name: str, hf_config, device: str = "cpu", native_bf16: bool | None = None
) -> torch.dtype:
    """`auto` keeps a float16 checkpoint in float16 and runs everything else in bfloat16, except on a
    CPU without native bf16 (`cpu_features`), where float32 is several times faster and both float16
    and bfloat16 run in float32."""
    if name == "auto":
        if device == "cpu" and not (has_native_bf16() if native_bf16 is None else native_bf16):
            return torch.float32
        stored = str(
            getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", "") or ""
        )
        return torch.float16 if "float16" in stored and "bfloat16" not in stored else torch.bfloat16
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {path}")
    return files


def read_model_args(
    path: str | Path, dtype: str = "auto", device: str = "cpu"
) -> tuple[ModelArgs, torch.dtype]:
    """The model's shape and the dtype it will run in on `device`, from its config.json alone."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").exists():
        raise ValueError(f"{path} is not an HF model folder (no config.json)")
    hf_config = AutoConfig.from_pretrained(path)
    return ModelArgs.from_hf_config(hf_config), resolve_dtype(dtype, hf_config, device)


def model_skeleton(args: ModelArgs, dtype: torch.dtype) -> CausalLM:
    """The model with every tensor on the meta device: structure only, to be bound to real storage."""
    with torch.device("meta"):
        return CausalLM(args).cast(dtype).eval().requires_grad_(False)


def load_model(
    path: str | Path,
    dtype: str = "auto",
    device: str = "cpu",
    pack: bool = True,
    shard: TPShard | None = None,
) -> tuple[CausalLM, ModelArgs]:
    """Load a checkpoint. `pack` pre-packs bf16 CPU linears for oneDNN (a private, unshareable layout:
    Semi-PD, whose processes share one copy of the weights, loads them unpacked); float32 CPU
    linears go through oneDNN on their own weights where it is faster (models/cpu_linears.py). With `shard`, only
    that tensor-parallel rank's slice is built and read, and the args returned are its shape."""
    path = Path(path)
    args, torch_dtype = read_model_args(path, dtype, device)
    if shard is not None:
        args = shard.local_args(args)
    model = model_skeleton(args, torch_dtype)
    model.to_empty(device=device)
    if args.tie_word_embeddings:  # to_empty gives each name its own storage: tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = args.rope()[0].to(device)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                index = (
                    shard.index(name, f.get_slice(name).get_shape()) if shard is not None else None
                )
                tensor = f.get_tensor(name) if index is None else f.get_slice(name)[index]
                _copy_weight(params, name, tensor, args, loaded)
    if args.tie_word_embeddings:
        loaded.add("lm_head.weight")
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(
            f"checkpoint {path} lacks weights: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    if pack and can_pack(model.model.embed_tokens.weight):
        pack_linears(model)
    else:
        use_onednn_fp32(model, args)
    return model.eval().requires_grad_(False), args


def _copy_weight(
    params: dict[str, torch.nn.Parameter],
    name: str,
    tensor: torch.Tensor,
    args: ModelArgs,
    loaded: set[str],
) -> None:
    match = _FUSED_NAME.match(name)
    if match is None:
        if name not in params:
            if name.endswith("rotary_emb.inv_freq") or (
                name == "lm_head.weight" and args.tie_word_embeddings
            ):
                return
            raise ValueError(f"unexpected weight {name!r} in checkpoint for {args.architecture}")
        params[name].data.copy_(tensor)
        loaded.add(name)
        return
    prefix, proj, kind = match.groups()
    fused_name, index = _FUSED[proj]
    target = params[f"{prefix}.{fused_name}.{kind}"]
    if fused_name == "qkv_proj":
        q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        sizes = [q, kv, kv]
    else:
        sizes = [args.intermediate_size] * 2
    offset = sum(sizes[:index])
    target.data[offset : offset + sizes[index]].copy_(tensor)
    loaded.add(f"{prefix}.{fused_name}.{kind}")
