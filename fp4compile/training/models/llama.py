"""A LLaMA-style byte-level decoder, the model the FP4 training benchmarks run.

The backend quantizes the matrix multiplications of linear layers and must
leave everything else (attention products, softmax, norms, embeddings) in high
precision. This model is written so that a graph pass can tell the two apart:

- every quantizable GEMM is an ``nn.Linear`` (bias-free), so it appears in the
  traced graph as a linear/matmul against a parameter;
- attention is written with explicit matmuls (``q @ k^T`` and ``probs @ v``)
  between two activations, not with ``scaled_dot_product_attention``, so the
  pass sees those products and can keep them in BF16/FP32;
- RMSNorm and softmax run in float32 whatever the autocast dtype.

The vocabulary is the 256 byte values, so no tokenizer is needed and the
embedding/LM-head parameters are a negligible part of the model: almost all
parameters sit in the linear layers the backend quantizes.

The forward pass has no Python branches on the sequence length (rotary tables
and the causal mask are precomputed for ``max_seq_len`` and sliced), so it
compiles with ``torch.compile(..., dynamic=True)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LlamaConfig",
    "PRESETS",
    "preset",
    "RMSNorm",
    "Attention",
    "SwiGLU",
    "Block",
    "Llama",
    "param_count",
]


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a :class:`Llama` model.

    ``ffn_dim`` is the hidden width of the SwiGLU MLP (the width of
    ``gate_proj``/``up_proj`` outputs). Keep ``dim`` and ``ffn_dim`` multiples
    of 16 (32 for MXFP4 blocks, 128 on GPU) so every block-scaled granularity
    tiles the reduction dimension exactly.
    """

    vocab_size: int = 256
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    ffn_dim: int = 704
    max_seq_len: int = 128
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if (self.dim // self.n_heads) % 2 != 0:
            raise ValueError("head_dim must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


# SwiGLU hidden widths follow LLaMA: about 8/3 * dim (which keeps the MLP's
# parameter count equal to a 4*dim GELU MLP), rounded to a hardware-friendly
# multiple. The GPU presets take the GPT-3 shape table (125M / 350M / 1.3B:
# dim 768x12 layers, 1024x24, 2048x24); with a 256-byte vocabulary the
# embeddings almost vanish, so their parameter counts are about 85M, 309M and
# 1.23B, nearly all of it in quantizable linear layers.
PRESETS: dict[str, LlamaConfig] = {
    # Unit tests: compiles and runs a step in well under a second on a CPU.
    "tiny": LlamaConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=128, max_seq_len=64),
    # About 0.87M parameters: small enough to train to about 20 tokens per
    # parameter (the compute-optimal ratio) on two CPU cores.
    "cpu-small": LlamaConfig(dim=128, n_layers=4, n_heads=4, ffn_dim=352, max_seq_len=128),
    # Default CPU benchmark model, about 3.3M parameters.
    "cpu": LlamaConfig(dim=256, n_layers=4, n_heads=4, ffn_dim=704, max_seq_len=128),
    # A larger CPU model (about 10.8M parameters) for longer runs.
    "cpu-large": LlamaConfig(dim=384, n_layers=6, n_heads=6, ffn_dim=1024, max_seq_len=256),
    "gpu-125m": LlamaConfig(dim=768, n_layers=12, n_heads=12, ffn_dim=2048, max_seq_len=1024),
    "gpu-350m": LlamaConfig(dim=1024, n_layers=24, n_heads=16, ffn_dim=2816, max_seq_len=1024),
    "gpu-1b": LlamaConfig(dim=2048, n_layers=24, n_heads=16, ffn_dim=5632, max_seq_len=2048),
}


def preset(name: str) -> LlamaConfig:
    """Return the named model configuration from :data:`PRESETS`."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def rotary_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape [max_seq_len, head_dim] for rotate-half RoPE."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    positions = torch.arange(max_seq_len, dtype=torch.float64)
    angles = torch.outer(positions, inv_freq)  # [seq, head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)  # [seq, head_dim]
    # Computed in float64 so the tables are exact to float32 rounding even at
    # the largest positions, then stored in float32.
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [b, heads, s, head_dim] by position; cos/sin are [s, head_dim]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated_half = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated_half.float() * sin).to(x.dtype)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary positions and explicit matmuls."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.q_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.o_proj = nn.Linear(config.dim, config.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        causal_mask: torch.Tensor,
    ) -> torch.Tensor:
        batch, seq, dim = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)

        # Activation-activation products: kept visible as plain matmuls so the
        # backend leaves them (and the softmax) in high precision.
        scores = q @ k.transpose(-2, -1) * self.scale
        scores = scores.masked_fill(~causal_mask, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        out = probs @ v  # [b, heads, s, head_dim]

        out = out.transpose(1, 2).reshape(batch, seq, dim)
        return self.o_proj(out)


class SwiGLU(nn.Module):
    """LLaMA MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        causal_mask: torch.Tensor,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, causal_mask)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """Byte-level LLaMA decoder: ``forward(idx[b, s]) -> logits[b, s, vocab]``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)

        # Derived constants, not state: persistent=False keeps them out of
        # state_dict, which therefore holds exactly the parameters.
        cos, sin = rotary_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        mask = torch.tril(torch.ones(config.max_seq_len, config.max_seq_len, dtype=torch.bool))
        self.register_buffer("causal_mask", mask, persistent=False)

        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2/LLaMA init: N(0, 0.02), residual output projections scaled down.

        ``o_proj`` and ``down_proj`` write into the residual stream, which sums
        2 * n_layers such contributions; scaling their std by
        1/sqrt(2 * n_layers) keeps the residual variance independent of depth.
        """
        std = 0.02
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual_output = name.endswith("o_proj") or name.endswith("down_proj")
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual_output else std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        seq = idx.shape[1]
        cos = self.rope_cos[:seq]
        sin = self.rope_sin[:seq]
        causal_mask = self.causal_mask[:seq, :seq]
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, causal_mask)
        return self.lm_head(self.norm(x))


def param_count(model: nn.Module, *, exclude_embeddings: bool = False) -> int:
    """Number of parameter elements; optionally without the token embedding table."""
    total = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        total -= sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    return total
