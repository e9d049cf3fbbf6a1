"""Transformer building blocks shared by every model family.

Pre-LayerNorm blocks (GPT-2 / ViT style); attention goes through
``F.scaled_dot_product_attention`` with the pattern handed in by the masking module, or,
for a layer built with a sparse pattern (the run config's ``attention:`` section), through
that layer's ``sparse_attention.PatternAttention`` (its own pattern ANDed with the causal
flag and padding handed in).
Axis letters: B batch, T tokens (or N patches), D width, H heads.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from .masking.attention import Attention, Pattern
from .sparse_attention import PatternAttention


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float = 0.0, pattern: PatternAttention | None = None):
        super().__init__()
        self.heads = heads
        self.pattern = pattern  # None: full attention (or what the Attention handed in says)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, attention: Attention) -> Tensor:
        b, t, d = x.shape  # (B, T, D)
        q, k, v = self.qkv(x).split(d, dim=2)
        # (B, T, D) -> (B, H, T, D/H)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        if self.pattern is not None:
            y = self.pattern(q, k, v, attention, dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, **attention.sdpa_args(t, t))
        y = y.transpose(1, 2).reshape(b, t, d)  # (B, T, D)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    # 4x expansion, GELU: the GPT-2 / BERT / ViT default.
    def __init__(self, width: int, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0, pattern: PatternAttention | None = None):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout, pattern)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = MLP(width, dropout)

    def forward(self, x: Tensor, attention: Attention) -> Tensor:
        x = x + self.attn(self.ln1(x), attention)
        return x + self.mlp(self.ln2(x))


def make_blocks(depth: int, width: int, heads: int, dropout: float = 0.0, attention=None, seed: int = 0,
                first_layer: int = 0, max_len: int = 0) -> nn.ModuleList:
    """``depth`` blocks; with an ``AttentionConfig`` of a sparse kind, block i runs the
    pattern of layer ``first_layer + i`` (BigBird draws its random blocks per layer, at the
    model's longest sequence ``max_len``)."""
    kernel = getattr(attention, "kernel", "auto")
    blocks = []
    for i in range(depth):
        pattern = Pattern.from_config(attention, seed, first_layer + i, max_len)
        blocks.append(Block(width, heads, dropout, None if pattern is None else PatternAttention(pattern, kernel)))
    return nn.ModuleList(blocks)


def attention_pairs(blocks: nn.ModuleList, t: int, causal: bool, device=None) -> float | None:
    """Mean over the blocks of the query-key pairs per row their attention computes at
    length ``t`` on ``device`` (the kernel that runs there; for the FLOP count); None
    when every block is full attention."""
    patterns = [b.attn.pattern for b in blocks]
    if all(p is None for p in patterns):
        return None
    device = device or next(blocks.parameters()).device
    return sum(t * t if p is None else p.pairs(t, causal, device) for p in patterns) / len(patterns)


def init_weights(module: nn.Module, depth: int) -> None:
    """GPT-2 initialization: N(0, 0.02), residual projections scaled by 1/sqrt(2 * depth)."""
    for name, p in module.named_parameters():
        if p.dim() < 2:
            if name.endswith("bias"):
                nn.init.zeros_(p)
            continue
        std = 0.02
        if name.endswith("proj.weight"):
            std = 0.02 / math.sqrt(2 * depth)
        nn.init.normal_(p, mean=0.0, std=std)
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def run_blocks(blocks: nn.ModuleList, x: Tensor, attention: Attention) -> Tensor:
    for block in blocks:
        x = block(x, attention)
    return x


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

