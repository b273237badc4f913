"""Qwen3 / Qwen2 / Llama decoder over a paged KV pool, in plain PyTorch.

One class covers the family: Qwen3 adds per-head q/k RMSNorm, Qwen2 adds q/k/v biases, Llama has
neither. q/k/v and gate/up projections are fused at load time (fewer, larger GEMMs).

The residual stream is kept in float32 whatever dtype the layers compute in: adding each layer's
bf16 output to a bf16 stream is where our bf16 lost most against float32 on a real model (SmolLM2,
teacher-forced KL to float32 1.1e-3 -> 6.3e-4, HF's bf16: 1.06e-3; benchmarks/precision.py). The
norms read the stream in float32 and round once, to the compute dtype; no measurable cost (the
float32 norm runs torch's fused kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgeacc_ray.models.attention import AttentionMetadata, paged_attention
from edgeacc_ray.models.config import ModelArgs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x [T, dim] float32 (the residual stream; the weight is float32 too) -> normed, in `dtype`."""
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps).to(dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        d = args.head_dim
        self.q_size, self.kv_size = args.num_heads * d, args.num_kv_heads * d
        self.qkv_proj = nn.Linear(
            args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.qkv_bias
        )
        self.o_proj = nn.Linear(self.q_size, args.hidden_size, bias=False)
        self.q_norm = RMSNorm(d, args.rms_norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(d, args.rms_norm_eps) if args.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        workspace: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        a = self.args
        qkv = self.qkv_proj(x)
        qk_size = self.q_size + self.kv_size
        qk = qkv[:, :qk_size].view(
            -1, a.num_heads + a.num_kv_heads, a.head_dim
        )  # q and k heads, normed
        v = qkv[:, qk_size:].view(-1, a.num_kv_heads, a.head_dim)  # and rotated together
        if self.q_norm is not None:
            qk = F.rms_norm(qk, (a.head_dim,), None, a.rms_norm_eps) * self._qk_norm_weight()
        q, k = apply_rope(qk, cos, sin).split([a.num_heads, a.num_kv_heads], dim=1)
        out = paged_attention(q, k, v, kv_cache, workspace, meta, a.head_dim**-0.5)
        return self.o_proj(out)

    def _qk_norm_weight(self) -> torch.Tensor:
        """[H + Hkv, D]: q_norm's weight for the q heads, k_norm's for the k heads (built once)."""
        if getattr(self, "_qk_weight", None) is None:
            a = self.args
            self._qk_weight = torch.cat(
                [
                    self.q_norm.weight.expand(a.num_heads, -1),
                    self.k_norm.weight.expand(a.num_kv_heads, -1),
                ]
            )
        return self._qk_weight


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        workspace: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """x [T, hidden] is the float32 residual stream; attention and MLP compute in cos/sin's dtype."""
        dtype = cos.dtype
        x = x + self.self_attn(self.input_layernorm(x, dtype), cos, sin, kv_cache, workspace, meta)
        return x + self.mlp(self.post_attention_layernorm(x, dtype))


class DecoderModel(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class CausalLM(nn.Module):
    """Token ids in, hidden states of every token out; `logits` projects only the rows asked for."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = DecoderModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq, self.rope_scaling = args.rope()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cast(self, dtype: torch.dtype) -> "CausalLM":
        """Weights in `dtype`, except the residual stream's norms: float32, like the stream."""
        self.to(dtype)
        for norm in [
            self.model.norm,
            *(
                n
                for layer in self.model.layers
                for n in (layer.input_layernorm, layer.post_attention_layernorm)
            ),
        ]:
            norm.float()
        return self

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        embeddings = self.model.embed_tokens(input_ids)
        dtype = embeddings.dtype
        cos, sin = self.rope(positions, dtype)
        x = embeddings.float()
        for i, (layer, kv_cache) in enumerate(zip(self.model.layers, kv_caches)):
            workspace = meta.workspace[i] if meta.workspace is not None else None
            x = layer(x, cos, sin, kv_cache, workspace, meta)
        return self.model.norm(x, dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def rope(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = self.rope_scaling
        return (emb.cos() * scale).to(dtype)[:, None, :], (emb.sin() * scale).to(dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE as HF applies it; x is [tokens, heads, head_dim]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
