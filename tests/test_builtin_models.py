"""The built-in models: deterministic builds, HF-loadable folders, tokenizer and chat template."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from edgeacc_ray.models import builtin_models
from edgeacc_ray.models.builtin_models import (
    ENDOFTEXT_ID,
    IM_END_ID,
    IM_START_ID,
    UnknownModelError,
    build_model,
    cache_dir,
    resolve_model,
)

FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())
    }


def test_build_is_deterministic(tmp_path: Path, tiny_model_path: str) -> None:
    first = build_model("tiny", tmp_path / "a", force=True)
    builtin_models._tokenizer_json.cache_clear()  # retrain the tokenizer too, not just reuse it
    second = build_model("tiny", tmp_path / "b", force=True)
    assert FILES <= set(file_hashes(first))
    assert file_hashes(first) == file_hashes(second) == file_hashes(Path(tiny_model_path))


def test_concurrent_builds_share_one_folder(tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(build_model("tiny", target)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [target, target]
    assert FILES <= {p.name for p in target.iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".tiny.lock",
        "tiny",
    ]  # no temp folders left


def test_loads_with_transformers(tiny_model_path: str) -> None:
    config = AutoConfig.from_pretrained(tiny_model_path)
    assert config.model_type == "qwen3" and config.tie_word_embeddings
    assert (config.vocab_size, config.hidden_size, config.head_dim) == (8000, 128, 32)
    model, info = AutoModelForCausalLM.from_pretrained(
        tiny_model_path, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    outputs = []
    for prompt in ["The quick brown fox", "def main():\n    return"]:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(ids).logits[0]
            out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=ENDOFTEXT_ID)
        top2 = logits.topk(2, dim=-1).values
        assert (top2[:, 0] - top2[:, 1]).median() > 0.1  # greedy is decisive, not a near-tie
        new = out[0, ids.shape[1] :].tolist()
        assert len(set(new)) > 3  # no collapse to one repeated token
        outputs.append(new)
    assert outputs[0] != outputs[1]  # the output depends on the prompt


ROUND_TRIP_TEXTS = [
    "héllo 世界 🙂",
    "def f(x):\n\treturn x ** 2  # ok\n",
    "  spaces   and\r\nCRLF",
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trips(tiny_model_path: str, text: str) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_special_tokens(tiny_model_path: str) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    assert len(tok) == 8000
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", IM_END_ID)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", ENDOFTEXT_ID)
    ids = tok.encode("<|im_start|><|im_end|><|endoftext|>", add_special_tokens=False)
    assert ids == [IM_START_ID, IM_END_ID, ENDOFTEXT_ID]


def test_chat_template(tiny_model_path: str) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "Again"}]},
    ]
    history = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nAgain<|im_end|>\n"
    )
    assert tok.apply_chat_template(messages, tokenize=False) == history
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == history + "<|im_start|>assistant\n"
    single = [{"role": "user", "content": "héllo"}]
    assert (
        tok.apply_chat_template(single, add_generation_prompt=True, tokenize=False)
        == "<|im_start|>user\nhéllo<|im_end|>\n<|im_start|>assistant\n"
    )


def test_resolve_model(
    tmp_path: Path, tiny_model_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resolve_model("tiny") == Path(tiny_model_path)
    assert resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(UnknownModelError):
        resolve_model("no-such-model")
    monkeypatch.setenv("EDGEACC_CACHE_DIR", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
