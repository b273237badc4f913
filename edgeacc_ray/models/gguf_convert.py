"""A GGUF file (llama.cpp's format) as a normal HF checkpoint folder, so one loader serves both.

The folder gets config.json and generation_config.json from the file's metadata, safetensors with
every tensor dequantized under its HF name, and the tokenizer with its chat template. Dequantized
weights are stored in bfloat16 (float32 / float16 when the file's weights all are): the serving dtype
is chosen when the folder is loaded, as for any checkpoint.

llama.cpp's converter reorders the rows of Llama's q/k projections (interleaved RoPE pairs instead
of HF's rotate-half halves); that is undone here. Qwen2/Qwen3 files are stored unpermuted.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import save_file

from edgeacc_ray.models.gguf_metadata import GGUFError, GGUFMetadata, UnsupportedGGUFError
from edgeacc_ray.models.gguf_tokenizer import tokenizer_config, tokenizer_json
from edgeacc_ray.models.model_cache import cache_dir, is_stamped, publish_folder

CONVERT_VERSION = (
    1  # bump when the conversion changes: converted folders of another version are redone
)
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
Q = gguf.GGMLQuantizationType
TENSOR_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)
SHARD_BYTES = 4 << 30  # weights above this are split over several safetensors files

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TENSOR_NAME = re.compile(r"^(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)$")
_ROPE_SCALING = ("none", "linear", "yarn")


def hf_name(name: str) -> str:
    """The HF name of GGUF tensor `name` ("blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight")."""
    match = _TENSOR_NAME.match(name)
    if match is not None:
        layer, base, kind = match.groups()
        table, prefix = (
            (_LAYER_NAMES, f"model.layers.{layer}.") if layer is not None else (_GLOBAL_NAMES, "")
        )
        if base in table:
            return f"{prefix}{table[base]}.{kind}"
    raise UnsupportedGGUFError(
        "tensor", name, tuple(_GLOBAL_NAMES) + tuple(f"blk.N.{n}" for n in _LAYER_NAMES)
    )


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Llama q/k row order: per head, rows (2i, 2i+1) go back to (i, i + head_dim/2)."""
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )


def hf_config(
    meta: GGUFMetadata, tensors: dict[str, gguf.ReaderTensor], dtype: torch.dtype
) -> dict[str, Any]:
    """config.json for the file's model, with HF's field names for its architecture."""
    if meta.arch not in ARCHITECTURES:
        raise UnsupportedGGUFError("architecture", meta.arch, tuple(ARCHITECTURES))
    heads = int(meta.require(".attention.head_count"))
    hidden = int(meta.require(".embedding_length"))
    head_dim = int(meta.get(".attention.key_length", hidden // heads))
    rope_dims = int(meta.get(".rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise UnsupportedGGUFError(
            "rope.dimension_count", str(rope_dims), (f"{head_dim} (RoPE on the whole head)",)
        )
    vocab = int(_hf_shape(tensors["token_embd.weight"])[0])
    context = int(meta.require(".context_length"))
    ids = {key: meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "padding")}
    config = {
        "architectures": [ARCHITECTURES[meta.arch]],
        "model_type": meta.arch,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(meta.require(".feed_forward_length")),
        "num_hidden_layers": int(meta.require(".block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(".attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": context,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(meta.require(".attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta.get(".rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(meta, context),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_dropout": 0.0,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["padding"],
    }
    if meta.arch == "llama":
        config |= {"attention_bias": "blk.0.attn_q.bias" in tensors, "mlp_bias": False}
    else:
        config |= {"use_sliding_window": False, "sliding_window": None}
    return config


def generation_config(meta: GGUFMetadata) -> dict[str, Any]:
    """generation_config.json: bos, pad, and every end token the file names (eos, end of turn/message)."""
    ends = [meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    ends = list(dict.fromkeys(e for e in ends if e is not None))
    return {
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": ends[0] if len(ends) == 1 else ends,
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }


def hf_weights(
    meta: GGUFMetadata,
    tensors: dict[str, gguf.ReaderTensor],
    config: dict[str, Any],
    dtype: torch.dtype,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor dequantized to `dtype`, under its HF name and shape, in file order."""
    for name, tensor in tensors.items():
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(
            np.float32, copy=True
        )
        weight = torch.from_numpy(values).reshape(_hf_shape(tensor))
        if meta.arch == "llama" and re.search(r"\.attn_[qk]\.", name):
            heads = (
                config["num_attention_heads"]
                if ".attn_q." in name
                else config["num_key_value_heads"]
            )
            weight = unpermute_qk(weight, heads)
        yield hf_name(name), weight.to(dtype)


def convert_gguf(path: str | Path, folder: Path) -> None:
    """Write the HF folder of GGUF file `path` into the existing empty `folder`."""
    reader = gguf.GGUFReader(path)
    meta = GGUFMetadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path} has no token_embd.weight tensor")
    dtype = _storage_dtype(tensors)
    config = hf_config(meta, tensors, dtype)
    for name, tensor in tensors.items():  # fail before any work: an unknown name raises here too
        if tensor.tensor_type not in TENSOR_TYPES:
            raise UnsupportedGGUFError(
                "tensor type",
                f"{tensor.tensor_type.name} ({name})",
                tuple(t.name for t in TENSOR_TYPES),
            )
        hf_name(name)

    def dump(filename: str, obj: dict[str, Any]) -> None:
        (folder / filename).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    dump("config.json", config)
    dump("generation_config.json", generation_config(meta))
    (folder / "tokenizer.json").write_text(tokenizer_json(meta))
    dump("tokenizer_config.json", tokenizer_config(meta, config["max_position_embeddings"]))
    _save_weights(hf_weights(meta, tensors, config, dtype), _shards(tensors, dtype), folder)


def converted_folder(path: str | Path) -> Path:
    """The cached HF folder of GGUF file `path`, converted on first use; keyed by the file's absolute
    path, size and modification time, so an edited or replaced file is converted again."""
    path = Path(path).expanduser().resolve()
    st = path.stat()
    stamp = {
        "source": str(path),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "version": CONVERT_VERSION,
    }
    key = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if is_stamped(folder, stamp):
        return folder
    return publish_folder(folder, stamp, lambda tmp: convert_gguf(path, tmp))


def _hf_shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    """GGUF lists dimensions innermost first; HF (row-major torch) outermost first."""
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def _f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999974738e-06)."""
    return float(str(np.float32(value)))


def _rope_scaling(meta: GGUFMetadata, context: int) -> dict[str, Any] | None:
    kind = meta.get(".rope.scaling.type", "none")
    if kind not in _ROPE_SCALING:
        raise UnsupportedGGUFError("RoPE scaling type", kind, _ROPE_SCALING)
    if kind == "none":
        return None
    scaling = {"rope_type": kind, "factor": _f32(meta.require(".rope.scaling.factor"))}
    if kind == "yarn":
        scaling["original_max_position_embeddings"] = int(
            meta.get(".rope.scaling.original_context_length", context)
        )
    return scaling


def _storage_dtype(tensors: dict[str, gguf.ReaderTensor]) -> torch.dtype:
    """float32 or float16 when every matrix is stored so (lossless); bfloat16 for quantized files."""
    types = {t.tensor_type for t in tensors.values() if len(t.shape) > 1}
    return {frozenset({Q.F32}): torch.float32, frozenset({Q.F16}): torch.float16}.get(
        frozenset(types), torch.bfloat16
    )


def _shards(tensors: dict[str, gguf.ReaderTensor], dtype: torch.dtype) -> list[list[str]]:
    """HF names grouped into consecutive files of at most SHARD_BYTES (one file when it all fits)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = int(tensor.n_elements) * itemsize
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(hf_name(name))
        size += nbytes
    return shards


def _save_weights(
    weights: Iterator[tuple[str, torch.Tensor]], shards: list[list[str]], folder: Path
) -> None:
    """Write the weights shard by shard (one shard in memory at a time), with an index when several."""
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map: dict[str, str] = {}
    total = 0
    for filename, shard in zip(names, shards):
        part = dict(next(weights) for _ in shard)
        save_file(part, str(folder / filename), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, filename)
        total += sum(t.numel() * t.element_size() for t in part.values())
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
