"""Attention patterns: boolean masks (True = the query may attend to the key) or the
fused-kernel flag ``is_causal``.

A pattern is data handed to the model; the model passes it to
``scaled_dot_product_attention`` unchanged. Prefer ``Attention(causal=True)`` over a dense
mask wherever the pattern is plain causal: only that form reaches the fused/flash kernels.
The backward-causal task is expressed as a flip of the sequence plus ``causal=True`` (see
``causal_lm.py``); ``backward_causal`` below is the dense reference used by tests and by
patterns that must be combined with others.

``Pattern`` is one layer's sparse attention rule (the ``attention:`` section of a run
config: sliding windows, Longformer's global tokens, BigBird's random blocks, GPT's
prefix-LM), stated once as ``rule(q, k)`` on position indices in reading order. The
kernels that run it (``lit_modules/sparse_attention.py``) build their block layouts from
this rule and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..lazy import LazyModule

if TYPE_CHECKING:
    from torch import Tensor

torch = LazyModule("torch")  # imported on first use (lit_modules/lazy.py)



@dataclass(frozen=True)
class Attention:
    """What a block's attention is allowed to see.

    causal: use the fused causal kernel (query t sees keys <= t).
    mask:   bool, broadcastable to (B, H, Tq, Tk); True = may attend. Combined with
            ``causal`` by logical AND if both are given (then the dense form is used).
    """

    causal: bool = False
    mask: Tensor | None = None

    def sdpa_args(self, t_q: int, t_k: int) -> dict:
        """Keyword arguments for ``F.scaled_dot_product_attention``."""
        if self.mask is None:
            return {"attn_mask": None, "is_causal": self.causal}
        mask = self.mask
        if self.causal:
            mask = mask & forward_causal(t_q, device=mask.device)
        return {"attn_mask": mask, "is_causal": False}

    def dense(self, t: int, device: torch.device | str = "cpu") -> Tensor:
        """The pattern as an explicit bool mask (broadcastable to (B, H, T, T))."""
        mask = torch.ones(t, t, dtype=torch.bool, device=device)
        if self.causal:
            mask = mask & forward_causal(t, device=device)
        if self.mask is not None:
            mask = mask & self.mask.to(device)
        return mask


def forward_causal(t: int, device: torch.device | str = "cpu") -> Tensor:
    """(T, T) query t sees keys <= t."""
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()


def backward_causal(t: int, device: torch.device | str = "cpu") -> Tensor:
    """(T, T) query t sees keys >= t.

    Built from the full T x T triangle of the current length, never sliced from a larger
    precomputed one: a flipped lower triangle cut to a shorter length is bidirectional.
    """
    return torch.ones(t, t, dtype=torch.bool, device=device).triu()


def padding(valid: Tensor) -> Tensor:
    """(B, T) bool valid tokens -> (B, 1, 1, T) keys that may be attended."""
    return valid[:, None, None, :]


def padding_pairs(valid_q: Tensor, valid_k: Tensor) -> Tensor:
    """Padding under a sparse pattern, on broadcastable query / key validity: a valid
    query never sees a padding key; a padding query is free (it then reads its own
    pattern, so no row is empty and no NaN reaches the gradients; its output is never
    scored)."""
    return valid_k | ~valid_q


def prefix_lm(t: int, prefix: Tensor | int, device: torch.device | str = "cpu") -> Tensor:
    """Prefix-LM: the first ``prefix`` positions attend bidirectionally among themselves,
    the rest causally. ``prefix`` is an int or a (B,) tensor -> (T, T) or (B, 1, T, T)."""
    q = torch.arange(t, device=device)[:, None]
    k = torch.arange(t, device=device)[None, :]
    if isinstance(prefix, int):
        return (k <= q) | (k < prefix)
    p = prefix.to(device)[:, None, None, None]  # (B, 1, 1, 1)
    return (k <= q) | (k < p)


def frame_causal(grid: tuple[int, int, int], device: torch.device | str = "cpu") -> Tensor:
    """(N, N) for tokens on a (T, h, w) grid flattened (t, y, x): a query at time step t
    may attend the keys of time steps <= t (all positions of those steps)."""
    t, h, w = grid
    step = torch.arange(t, device=device).repeat_interleave(h * w)  # (N,)
    return step[:, None] >= step[None, :]


def combine(*masks: Tensor | None) -> Tensor | None:
    """Logical AND of broadcastable bool masks; ``None`` entries are ignored."""
    out = None
    for m in masks:
        if m is None:
            continue
        out = m if out is None else (out & m)
    return out


# ---------------------------------------------------------------- sparse patterns


@dataclass(frozen=True)
class Pattern:
    """One layer's attention pattern (an ``AttentionConfig`` bound to the run's seed and a
    layer), in reading order: a causal model ANDs it with causal attention on the
    sequence it reads, so GPT's backward direction (the reversed sequence) gets the mirror.

    sliding:     |q - k| <= window.
    longformer:  sliding, or q < global_tokens, or k < global_tokens.
    bigbird:     longformer, or key block k // block_size is one of ``random_blocks``
                 blocks drawn for query block q // block_size (per layer, from the hash of
                 (seed, layer); never a block the window or the global tokens already cover;
                 for a causal model only blocks up to the query's).
    prefix:      k <= q or k < prefix (prefix-LM; it replaces causal attention).
    """

    kind: str
    window: int = 0
    global_tokens: int = 0
    random_blocks: int = 0
    block_size: int = 16
    prefix: int = 0
    seed: int = 0
    layer: int = 0
    max_len: int = 0  # the model's longest sequence: BigBird draws its blocks at this length

    @classmethod
    def from_config(cls, cfg, seed: int, layer: int, max_len: int = 0) -> Pattern | None:
        """The pattern of layer ``layer`` for a ``config.AttentionConfig`` in a model of
        sequences up to ``max_len`` tokens (0: the length at hand); None for full."""
        if cfg is None or cfg.kind == "full":
            return None
        return cls(kind=cfg.kind, window=cfg.window, global_tokens=cfg.global_tokens,
                   random_blocks=cfg.random_blocks if cfg.kind == "bigbird" else 0,
                   block_size=cfg.block_size, prefix=cfg.prefix, seed=seed, layer=layer, max_len=max_len)

    def random_table(self, t: int, causal: bool, device: torch.device | str = "cpu") -> Tensor | None:
        """(nb, nb) bool, nb = ceil(t / block_size): key block j is one of query block i's
        random blocks. Drawn once at the model's length ``max_len`` (the ``random_blocks``
        eligible blocks with the smallest hash of (seed, layer, i, j)) and cut to t: a
        shorter or padded sequence reads the blocks the model trained with, never others
        (near its end a query block may keep fewer than ``random_blocks``)."""
        if not self.random_blocks:
            return None
        from .rng import Stream, bits_at, step_stream

        nb = -(-max(t, self.max_len) // self.block_size)
        i = torch.arange(nb, device=device)[:, None]
        j = torch.arange(nb, device=device)[None, :]
        stream = step_stream(self.seed, self.layer, Stream.ATTENTION_BLOCKS).to(device)
        score = bits_at(stream, i * (1 << 20) + j)  # (nb, nb), 32-bit
        near = -(-self.window // self.block_size)  # blocks a window of that width reaches
        eligible = ((i - j).abs() > near) & (j * self.block_size >= self.global_tokens)
        if causal:
            eligible &= j <= i
        score = torch.where(eligible, score, torch.full_like(score, 1 << 40))
        r = min(self.random_blocks, nb)
        pick = score.topk(r, dim=1, largest=False).indices  # (nb, r)
        table = torch.zeros(nb, nb, dtype=torch.bool, device=device)
        table.scatter_(1, pick, True)
        n = -(-t // self.block_size)
        return (table & eligible)[:n, :n]

    def rule(self, t: int, causal: bool, device: torch.device | str = "cpu") -> Callable[[Tensor, Tensor], Tensor]:
        """``allowed(q, k)`` on broadcastable position tensors (< t): True = q may attend k.
        Written with elementwise ops and one table lookup, so it is also a FlexAttention
        ``mask_mod`` (``lambda b, h, q, k: rule(q, k)``)."""
        if self.kind == "prefix":
            p = self.prefix
            return lambda q, k: (k <= q) | (k < p)
        w, g, bs = self.window, self.global_tokens, self.block_size
        table = self.random_table(t, causal, device)
        last = -(-t // bs) - 1  # a kernel may ask about positions past t (its padding): no index past the table

        def allowed(q: Tensor, k: Tensor) -> Tensor:
            ok = (q - k).abs() <= w
            if g:
                ok = ok | (q < g) | (k < g)
            if table is not None:
                ok = ok | table[(q // bs).clamp(max=last), (k // bs).clamp(max=last)]
            if causal:
                ok = ok & (k <= q)
            return ok

        return allowed

    def dense(self, t: int, causal: bool, device: torch.device | str = "cpu") -> Tensor:
        """(T, T) bool, the rule at every (query, key)."""
        pos = torch.arange(t, device=device)
        return self.rule(t, causal, device)(pos[:, None], pos[None, :])

    def scored(self, t: int, device: torch.device | str = "cpu") -> Tensor | None:
        """(T,) bool: the positions a next-token loss may score without the target being
        visible (prefix-LM: position q < prefix - 1 sees its next token); None = all."""
        if self.kind != "prefix":
            return None
        return torch.arange(t, device=device) >= self.prefix - 1

    def global_rows(self, causal: bool) -> int:
        """Leading query rows that attend to every key (none under causal attention)."""
        return 0 if causal else self.global_tokens
