"""Model shape read from an HF config.json, for the architectures the native engine runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = (
    "Qwen3ForCausalLM",
    "Qwen2ForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
)


@dataclass
class ModelArgs:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qk_norm: bool
    qkv_bias: bool
    hf_config: Any  # the transformers config, kept for RoPE parameters

    @classmethod
    def from_hf_config(cls, cfg: Any) -> "ModelArgs":
        arch = (getattr(cfg, "architectures", None) or ["?"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported model architecture {arch!r}; the native engine runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} (use the sglang backend for others)"
            )
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(
                f"unsupported hidden_act {cfg.hidden_act!r}; only 'silu' is implemented"
            )
        heads = cfg.num_attention_heads
        return cls(
            architecture=arch,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            rms_norm_eps=cfg.rms_norm_eps,
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(getattr(cfg, "attention_bias", False)),
            hf_config=cfg,
        )

    def rope(self) -> tuple[torch.Tensor, float]:
        """RoPE inverse frequencies and the attention scaling that some RoPE variants apply."""
        params = getattr(self.hf_config, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            theta = params.get("rope_theta", getattr(self.hf_config, "rope_theta", 10000.0))
            dims = torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim
            return 1.0 / (theta**dims), 1.0
        if rope_type == "dynamic":
            raise ValueError("dynamic RoPE scaling is not supported by the native engine")
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](self.hf_config, torch.device("cpu"))
        return inv_freq.float(), float(scaling)
