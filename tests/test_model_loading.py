"""The loader: sharded checkpoints, dtypes, Qwen2/Llama variants, and clear refusals."""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import pytest
import torch

from edgeacc_ray import LLM, SamplingParams
from edgeacc_ray.models.cpu_features import has_native_bf16
from edgeacc_ray.models.loader import load_model

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPTS = [[11, 22, 33, 44, 55], list(range(100, 160))]


def _hf_greedy(path: Path, prompt: list[int], n: int = 8) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


def test_sharded_checkpoint_loads_like_the_single_file(tiny_model_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    model.save_pretrained(tmp_path, max_shard_size="1MB")
    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    sharded = LLM(str(tmp_path), dtype="float32").generate(PROMPTS, GREEDY)
    single = LLM(tiny_model_path, dtype="float32").generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in sharded] == [o.token_ids for o in single]


@pytest.mark.parametrize(
    "dtype,expected",
    [
        ("float32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
        ("auto", torch.bfloat16 if has_native_bf16() else torch.float32),
    ],
)
def test_dtypes(tiny_model_path, dtype, expected):
    model, _ = load_model(tiny_model_path, dtype)
    assert model.model.embed_tokens.weight.dtype == expected
    assert model.inv_freq.dtype == torch.float32


@pytest.mark.parametrize("stored", ["bfloat16", "float16", "float32"])
def test_auto_runs_float32_on_a_cpu_without_native_bf16(stored):
    """bf16 GEMMs without hardware support are converted element by element (9 vs 78 GFLOP/s on an
    AVX2 box), so `auto` picks float32 there; with native bf16, a float16 checkpoint stays float16."""
    from types import SimpleNamespace

    from edgeacc_ray.models.loader import resolve_dtype

    config = SimpleNamespace(torch_dtype=stored)
    assert resolve_dtype("auto", config, "cpu", native_bf16=False) == torch.float32
    assert resolve_dtype("auto", config, "cpu", native_bf16=True) == (
        torch.float16 if stored == "float16" else torch.bfloat16
    )
    assert resolve_dtype("auto", config, "cuda", native_bf16=False) == (
        torch.float16 if stored == "float16" else torch.bfloat16
    )
    assert resolve_dtype("bfloat16", config, "cpu", native_bf16=False) == torch.bfloat16


def test_cpu_features_read_the_flags_that_decide_bf16():
    from edgeacc_ray.models.cpu_features import can_pack_bf16

    assert has_native_bf16(frozenset({"avx2", "amx_bf16"})) and not has_native_bf16(
        frozenset({"avx2", "fma"})
    )
    if platform.machine() == "x86_64":
        assert can_pack_bf16(frozenset({"avx512bw", "avx512vl", "avx512dq"}))
        assert not can_pack_bf16(frozenset({"avx2", "fma"}))
        assert can_pack_bf16(frozenset({"avx2", "avx_ne_convert"}))


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "LlamaForCausalLM"])
def test_qwen2_and_llama_match_hf(tmp_path, arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}[arch]
    config = AutoConfig.for_model(
        model_type,
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        architectures=[arch],
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    from edgeacc_ray.models.config import ModelArgs

    args = ModelArgs.from_hf_config(AutoConfig.from_pretrained(tmp_path))
    assert args.qkv_bias == (arch == "Qwen2ForCausalLM") and not args.qk_norm
    model, _ = load_model(tmp_path, "float32")
    prompt = [5, 17, 42, 99, 3, 250]
    ours = _greedy_with_model(model, args, prompt)
    assert ours == _hf_greedy(tmp_path, prompt)


def _greedy_with_model(model, args, prompt: list[int], n: int = 8) -> list[int]:
    """Greedy decode through the native model and runner (no tokenizer needed)."""
    from edgeacc_ray.engine.kv import BlockManager
    from edgeacc_ray.engine.request import Sequence
    from edgeacc_ray.engine.runner import ModelRunner
    from edgeacc_ray.engine.scheduling import AdmissionPolicy, RunningBound, Scheduler

    runner = ModelRunner(model, args, num_pages=64, page_size=16, workspace_bytes=1 << 24)
    blocks = BlockManager(64, 16)
    scheduler = Scheduler(
        blocks, AdmissionPolicy(16, 64 * 16, RunningBound(8, tpot_slo_ms=None)), 256
    )
    seq = Sequence(
        "r", list(prompt), SamplingParams(max_tokens=n, temperature=0.0), arrival_time=0.0
    )
    scheduler.add(seq)
    while seq.num_output_tokens < n:
        batch = scheduler.schedule()
        logits, _ = runner.run(batch)
        for s, k in batch.items:
            s.num_computed_tokens += k
        seq.token_ids.append(int(logits[0].argmax()))
    return seq.output_token_ids


def test_unsupported_architecture_is_refused(tiny_model_path, tmp_path):
    folder = tmp_path / "gpt2ish"
    shutil.copytree(tiny_model_path, folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported model architecture 'GPT2LMHeadModel'"):
        load_model(folder)


def test_missing_weights_are_named(tiny_model_path, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial"
    shutil.copytree(tiny_model_path, folder)
    weights = load_file(folder / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ValueError, match="lacks weights: model.norm.weight"):
        load_model(folder)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ValueError, match="not an HF model folder"):
        load_model(tmp_path)
