"""Attention patterns: boolean masks (True = the query may attend to the key) or the
fused-kernel flag ``is_causal``.

A pattern is data handed to the model; the model passes it to
``scaled_dot_product_attention`` unchanged. Prefer ``Attention(causal=True)`` over a dense
mask wherever the pattern is plain causal: only that form reaches the fused/flash kernels.
The backward-causal task is expressed as a flip of the sequence plus ``causal=True`` (see
``causal_lm.py``); ``backward_causal`` below is the dense reference used by tests and by
patterns that must be combined with others.
"""

from __future__ import annotations

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


def sliding_window(
    t: int, window: int, direction: str = "fw", device: torch.device | str = "cpu"
) -> Tensor:
    """(T, T) causal attention limited to the last ``window`` keys (including itself).

    direction "fw": keys in (t - window, t]; "bw": keys in [t, t + window).
    """
    if window < 1:
        raise ValueError(f"sliding window = {window}: must be an integer >= 1")
    q = torch.arange(t, device=device)[:, None]
    k = torch.arange(t, device=device)[None, :]
    if direction == "fw":
        return (k <= q) & (k > q - window)
    if direction == "bw":
        return (k >= q) & (k < q + window)
    raise ValueError(f"sliding window direction = {direction!r}: allowed 'fw', 'bw'")


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
