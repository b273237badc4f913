"""GGUF files as models: small GGUF files written with the `gguf` package the way llama.cpp's converter
writes them (names, Llama's q/k row order, metadata, tokenizer) convert back into the HF folder they
came from, for every supported tensor type; unsupported ones fail naming what is unsupported; a
`.gguf` model path is converted once into the cache and served by the engine like the folder."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from benchmarks.precision import hf_decode
from edgeacc_ray.engine.request import SamplingParams
from edgeacc_ray.llm import LLM
from edgeacc_ray.models.builtin_models import resolve_model
from edgeacc_ray.models.gguf_convert import convert_gguf, converted_folder
from edgeacc_ray.models.gguf_metadata import UnsupportedGGUFError

Q = gguf.GGMLQuantizationType
QUANTIZABLE = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]  # gguf.quants can write these
K_QUANTS = {
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
}  # gguf only reads these: byte offsets of fp16 scales
HF_TO_GGUF = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TEXTS = [
    "héllo 世界 🙂",
    "def f(x):\n\treturn x ** 2  # ok\n",
    "I'm 3.14 can't   stop!!\r\n",
    "<|im_start|>user\nhi<|im_end|>",
]


def gguf_name(hf: str) -> str:
    """llama.cpp's tensor name for HF name `hf`."""
    base, kind = hf.rsplit(".", 1)
    if base.startswith("model.layers."):
        _, _, layer, rest = base.split(".", 3)
        return f"blk.{layer}.{HF_TO_GGUF[rest]}.{kind}"
    return f"{HF_TO_GGUF[base]}.{kind}"


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: q/k rows into interleaved-pair RoPE order."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_gguf(
    path: Path,
    arch: str,
    model: tuple[dict, dict[str, np.ndarray]],
    tokenizer_folder: Path,
    qtype: Q = Q.F32,
    tokenizer_model: str = "gpt2",
    pre: str = "qwen2",
    extra: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Write `model` (config.json, HF-named float weights) as a GGUF file of architecture `arch`, with the
    tokenizer of `tokenizer_folder`, matrices stored as `qtype` (K-quants: random blocks with sane
    scales, since gguf cannot quantize to them) and `extra` F32 tensors under their GGUF names.
    Returns the weights the file holds, dequantized, under HF names."""
    config, weights = model
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    tok = json.loads((tokenizer_folder / "tokenizer.json").read_text())
    specials = {t["id"]: t["content"] for t in tok["added_tokens"]}
    tokens = sorted(tok["model"]["vocab"], key=tok["model"]["vocab"].get) + [
        specials[i] for i in sorted(specials)
    ]
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
    writer.add_token_merges([" ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(
        json.loads((tokenizer_folder / "tokenizer_config.json").read_text())["chat_template"]
    )
    rng = np.random.default_rng(0)
    stored = {}
    for name, weight in weights.items():
        if arch != "qwen3" and ("q_norm" in name or "k_norm" in name):
            continue
        permuted = name.endswith(("q_proj.weight", "k_proj.weight")) and arch == "llama"
        rows_per = heads if "q_proj" in name else kv_heads
        data = llama_cpp_permute(weight, rows_per) if permuted else weight
        kind = Q.F32 if weight.ndim == 1 else qtype
        if kind in K_QUANTS:
            block_size, type_size = gguf.GGML_QUANT_SIZES[kind]
            blocks = rng.integers(
                0, 256, (weight.shape[0], weight.shape[1] // block_size, type_size), dtype=np.uint8
            )
            for offset in K_QUANTS[kind]:
                scales = rng.uniform(0.001, 0.01, blocks.shape[:2]).astype(np.float16)
                blocks[:, :, offset : offset + 2] = scales[..., None].view(np.uint8)
            data = blocks.reshape(weight.shape[0], -1)
        elif kind in (Q.F32, Q.F16):
            data = data.astype(np.float32 if kind == Q.F32 else np.float16)
        else:
            data = gguf.quants.quantize(data, kind)
        writer.add_tensor(gguf_name(name), data, raw_dtype=kind)
        held = gguf.quants.dequantize(data, kind).reshape(weight.shape)
        if permuted:  # the inverse of llama_cpp_permute
            held = (
                held.reshape(rows_per, -1, 2, *weight.shape[1:])
                .swapaxes(1, 2)
                .reshape(weight.shape)
            )
        stored[name] = held
    for name, tensor in (extra or {}).items():
        writer.add_tensor(name, tensor, raw_dtype=Q.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


@pytest.fixture(scope="module")
def tiny_source(tiny_model_path: str) -> Path:
    return Path(tiny_model_path)


@pytest.fixture(scope="module")
def tiny(tiny_source: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The built-in tiny model (Qwen3 names and shapes), its weights as float32 arrays, plus q/k/v biases
    (which Qwen2 files carry)."""
    config = json.loads((tiny_source / "config.json").read_text())
    weights = {
        k: v.float().numpy() for k, v in load_file(tiny_source / "model.safetensors").items()
    }
    return config, weights


@pytest.fixture(scope="module")
def k_quant_shaped(tiny: tuple[dict, dict[str, np.ndarray]]) -> tuple[dict, dict[str, np.ndarray]]:
    """A one-layer model whose matrix rows are whole 256-value K-quant blocks, random weights."""
    config = tiny[0] | dict(
        hidden_size=256, intermediate_size=512, head_dim=64, num_hidden_layers=1
    )
    hidden, inter, head_dim = 256, 512, 64
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = {
        "model.embed_tokens.weight": (config["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    p = "model.layers.0."
    shapes |= {
        p + "input_layernorm.weight": (hidden,),
        p + "post_attention_layernorm.weight": (hidden,),
        p + "self_attn.q_proj.weight": (q, hidden),
        p + "self_attn.k_proj.weight": (kv, hidden),
        p + "self_attn.v_proj.weight": (kv, hidden),
        p + "self_attn.o_proj.weight": (hidden, q),
        p + "self_attn.q_norm.weight": (head_dim,),
        p + "self_attn.k_norm.weight": (head_dim,),
        p + "mlp.gate_proj.weight": (inter, hidden),
        p + "mlp.up_proj.weight": (inter, hidden),
        p + "mlp.down_proj.weight": (hidden, inter),
    }
    rng = np.random.default_rng(1)
    return config, {
        name: rng.standard_normal(shape).astype(np.float32) * 0.05 for name, shape in shapes.items()
    }


def with_qkv_bias(model: tuple[dict, dict[str, np.ndarray]]) -> tuple[dict, dict[str, np.ndarray]]:
    config, weights = model
    rng = np.random.default_rng(2)
    biases = {
        name.replace(".weight", ".bias"): rng.standard_normal(w.shape[0]).astype(np.float32)
        for name, w in weights.items()
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))
    }
    return config, weights | biases


def convert(tmp_path: Path, gguf_path: Path) -> Path:
    folder = tmp_path / "hf"
    folder.mkdir()
    convert_gguf(gguf_path, folder)
    return folder


def test_llama_cpp_permutation_is_undone(tmp_path: Path, tiny_source: Path, tiny) -> None:
    write_gguf(tmp_path / "m.gguf", "llama", tiny, tiny_source)
    folder = convert(tmp_path, tmp_path / "m.gguf")
    original, converted = (
        load_file(tiny_source / "model.safetensors"),
        load_file(folder / "model.safetensors"),
    )
    assert (
        converted["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    )  # an all-F32 file stays F32
    for name, weight in converted.items():  # bf16 values survive F32 exactly
        assert torch.equal(weight, original[name].float()), name
    assert "model.layers.0.self_attn.q_norm.weight" not in converted


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("qtype", QUANTIZABLE + list(K_QUANTS), ids=lambda q: q.name)
def test_round_trip(
    tmp_path: Path, tiny_source: Path, tiny, k_quant_shaped, arch: str, qtype: Q
) -> None:
    """Every tensor comes back exactly as the file holds it, under its HF name and shape."""
    path = tmp_path / "m.gguf"
    model = k_quant_shaped if qtype in K_QUANTS else tiny
    stored = write_gguf(
        path, arch, with_qkv_bias(model) if arch == "qwen2" else model, tiny_source, qtype
    )
    folder = convert(tmp_path, path)
    converted = load_file(folder / "model.safetensors")
    assert set(converted) == set(stored)
    dtype = {Q.F32: torch.float32, Q.F16: torch.float16}.get(qtype, torch.bfloat16)
    for name, held in stored.items():
        assert torch.equal(converted[name], torch.from_numpy(held).to(dtype)), name
    config = AutoConfig.from_pretrained(folder)
    assert config.architectures == [
        {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[
            arch
        ]
    ]
    source = model[0]
    assert (
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.intermediate_size,
    ) == (
        source["hidden_size"],
        source["num_hidden_layers"],
        4,
        2,
        source["head_dim"],
        source["intermediate_size"],
    )
    assert config.tie_word_embeddings and config.rms_norm_eps == 1e-6


def test_tokenizer_chat_template_and_generation_config(
    tmp_path: Path, tiny_source: Path, tiny
) -> None:
    write_gguf(tmp_path / "m.gguf", "qwen3", tiny, tiny_source)
    folder = convert(tmp_path, tmp_path / "m.gguf")
    ours, original = (
        AutoTokenizer.from_pretrained(folder),
        AutoTokenizer.from_pretrained(tiny_source),
    )
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == original.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == text
    messages = [{"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    ) == original.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert (ours.eos_token, ours.pad_token, ours.bos_token) == (
        "<|im_end|>",
        "<|endoftext|>",
        "<|endoftext|>",
    )
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 7997, "eos_token_id": 7999, "pad_token_id": 7997}


@pytest.mark.parametrize(
    "change, feature, value",
    [
        (dict(arch="phi3"), "architecture", "phi3"),
        (dict(qtype=Q.Q5_0), "tensor type", "Q5_0 (token_embd.weight)"),
        (dict(tokenizer_model="llama"), "tokenizer model", "llama"),
        (dict(pre="deepseek-llm"), "pre-tokenizer", "deepseek-llm"),
        (dict(extra={"rope_freqs.weight": np.ones(16, np.float32)}), "tensor", "rope_freqs.weight"),
    ],
)
def test_unsupported_files_are_named(
    tmp_path: Path, tiny_source: Path, tiny, change: dict, feature: str, value: str
) -> None:
    args = dict(arch="qwen3") | change
    path = tmp_path / "m.gguf"
    write_gguf(path, args.pop("arch"), tiny, tiny_source, **args)
    with pytest.raises(UnsupportedGGUFError) as error:
        convert(tmp_path, path)
    assert (error.value.feature, error.value.value) == (feature, value)


def test_gguf_model_path_is_converted_once_and_served(
    tmp_path: Path, tiny_source: Path, tiny, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A .gguf path resolves to a cached conversion (redone when the file changes); the engine serves it
    in float32 token for token like HF transformers serves the converted folder."""
    monkeypatch.setenv("EDGEACC_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "tiny-llama.gguf"
    write_gguf(path, "llama", tiny, tiny_source, Q.Q8_0)
    folder = resolve_model(str(path))
    assert folder == converted_folder(path) and folder.parent == tmp_path / "cache" / "gguf"
    stamp = (folder / ".edgeacc_stamp.json").stat().st_mtime_ns
    assert (
        resolve_model(str(path)) == folder
        and (folder / ".edgeacc_stamp.json").stat().st_mtime_ns == stamp
    )

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS[:3]]
    with LLM(str(path), dtype="float32", num_threads=1, kv_cache_memory_gb=0.05) as llm:
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert [out.token_ids for out in outs] == [hf_decode(hf, prompt, 8)[0] for prompt in prompts]

    write_gguf(
        path, "llama", tiny, tiny_source, Q.Q4_0
    )  # a new file at the same path: converted again
    assert resolve_model(str(path)) != folder
