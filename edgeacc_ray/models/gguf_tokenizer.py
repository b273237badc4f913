"""The HF tokenizer files (tokenizer.json, tokenizer_config.json) of a GGUF file's embedded tokenizer.

GGUF stores a byte-level BPE tokenizer ("gpt2" model) as its vocabulary, merges and token types; how
text is split before BPE is only named (`tokenizer.ggml.pre`), so the split for each supported name is
spelled out here as llama.cpp applies it (llama-vocab.cpp).
"""

from __future__ import annotations

from typing import Any

from edgeacc_ray.models.gguf_metadata import GGUFError, GGUFMetadata, UnsupportedGGUFError

# GGUF token types (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4

# Split patterns; None is GPT-2's, built into the ByteLevel pre-tokenizer.
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS = {  # tokenizer.ggml.pre -> (split pattern, digits split one by one first, NFC first)
    "gpt2": (None, False, False),
    "smollm": (None, True, False),  # StarCoder-style: every digit apart, then GPT-2's split
    "starcoder": (None, True, False),
    "refact": (None, True, False),
    "qwen2": (_QWEN2_PATTERN, False, True),
    "llama-bpe": (_LLAMA3_PATTERN, False, False),
    "llama3": (_LLAMA3_PATTERN, False, False),
}


def tokenizer_json(meta: GGUFMetadata) -> str:
    """The `tokenizers` library's serialized tokenizer for the file's vocabulary."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    kind = meta.require("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedGGUFError("tokenizer model", kind, ("gpt2",))
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    if pre not in _PRE_TOKENIZERS:
        raise UnsupportedGGUFError("pre-tokenizer", pre, tuple(_PRE_TOKENIZERS))
    pattern, split_digits, nfc = _PRE_TOKENIZERS[pre]
    tokens: list[str] = meta.require("tokenizer.ggml.tokens")
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ")) for m in meta.require("tokenizer.ggml.merges")]
    if any(len(m) != 2 for m in merges):
        raise GGUFError("GGUF tokenizer merges must be pairs separated by one space")

    tok = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=False)
    )
    if nfc:
        tok.normalizer = normalizers.NFC()
    splits = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    if pattern is not None:
        splits.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pattern is None)]
    )
    tok.decoder = decoders.ByteLevel()
    post = [processors.ByteLevel(trim_offsets=False)]
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        post.append(
            processors.TemplateProcessing(
                single=f"{tokens[bos]} $A",
                pair=f"{tokens[bos]} $A $B",
                special_tokens=[(tokens[bos], bos)],
            )
        )
    tok.post_processor = processors.Sequence(post)
    tok.add_tokens(
        [
            AddedToken(t, special=ty == _CONTROL, normalized=False)
            for t, ty in zip(tokens, types)
            if ty in (_CONTROL, _USER_DEFINED)
        ]
    )
    if tok.get_vocab_size() != len(tokens):
        raise GGUFError(
            f"GGUF tokenizer has {len(tokens)} tokens but builds into {tok.get_vocab_size()}"
        )
    return tok.to_str(pretty=True)


def tokenizer_config(meta: GGUFMetadata, max_length: int) -> dict[str, Any]:
    """tokenizer_config.json: special tokens by name, the chat template, and the added tokens."""
    tokens: list[str] = meta.require("tokenizer.ggml.tokens")
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None and index < len(tokens) else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "special": ty == _CONTROL,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            }
            for i, (t, ty) in enumerate(zip(tokens, types))
            if ty in (_CONTROL, _USER_DEFINED)
        },
    }
    template = meta.get("tokenizer.chat_template")
    return config | ({"chat_template": template} if template else {})
