"""Kernels that run a sparse attention pattern (``masking/attention.py``'s ``Pattern``)
and pay only for the key blocks it reads.

A layer's pattern becomes a **layout**, built once per (sequence length, causal, device)
from the pattern's rule and cached on the layer:

- ``blocks`` (any device, training included): the sequence is cut into tiles of
  ``block_size`` tokens; each query tile reads the K key tiles its rows may attend (the
  same K for every tile, short lists padded with a tile that is masked out), gathered
  into a (B, H * n, K*bs, D/H) tensor, and one ``scaled_dot_product_attention`` call runs
  every tile at once under the rule's in-tile boolean mask. Cost and memory are
  O(T * K * bs): linear in T for a fixed window, global count and random-block count.
  Global query rows (a bidirectional model's global tokens, which attend to every key)
  are one extra SDPA call of g rows over all T keys, also linear in T.
- ``flex`` (CUDA): ``torch.nn.attention.flex_attention`` under a ``BlockMask`` made from
  the same tiles at 128 tokens, the rule as its ``mask_mod``; the padding of a batch is
  added to the ``mask_mod`` on the cached block lists. FlexAttention has no backward
  pass on CPU in torch 2.13, so on CPU it is used only without gradients.
- ``dense``: SDPA with the rule as one cached (T, T) boolean mask (prefix-LM, whose
  rows after the prefix read every earlier key, and short sequences, where the tiles
  would compute more than half of the T x T pairs anyway).

Padding (``Attention(mask=padding(valid))``, the rule ``masking.attention.padding_pairs``) is never seen by a valid query; a padding
query reads its own pattern (so no row is empty and no NaN reaches the gradients; its
output is never scored). Never a dense T x T float mask: the masks are boolean; the
``blocks`` and ``flex`` layouts evaluate the rule a chunk of query rows at a time, and only
the ``dense`` kernel keeps a (T, T) mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .masking.attention import Attention, Pattern, padding_pairs

FLEX_BLOCK = 128  # FlexAttention's tile on GPUs


@dataclass(frozen=True)
class Layout:
    """How one (length, causal, device) runs.

    kernel:      "blocks" | "dense" | "flex".
    pairs:       query-key pairs per row of the batch and head the kernel computes
                 (the attention FLOPs are 4 * pairs * D per row).
    dense:       (T, T) bool rule ("dense" only).
    idx:         (n, K) long, the key tiles each query tile reads ("blocks").
    inblock:     (n, bs, K * bs) bool, the rule inside the gathered tiles ("blocks").
    global_rows: leading query rows computed over every key ("blocks").
    block_mask:  the FlexAttention BlockMask ("flex").
    """

    kernel: str
    t: int
    pairs: int
    block: int = 0
    dense: Tensor | None = None
    idx: Tensor | None = None
    inblock: Tensor | None = None
    global_rows: int = 0
    block_mask: object = None
    _by_heads: dict = field(default_factory=dict, compare=False, repr=False)

    def heads_mask(self, heads: int) -> Tensor:
        """The in-tile mask repeated for ``heads`` heads: (1, H * n, bs, K * bs), cached."""
        if heads not in self._by_heads:
            n, bs, kb = self.inblock.shape
            self._by_heads[heads] = self.inblock[None].expand(heads, n, bs, kb).reshape(1, heads * n, bs, kb)
        return self._by_heads[heads]


def _rule_rows(rule, t: int, bs: int, skip_rows: int, device) -> tuple[int, int, object]:
    """(n tiles, rows per chunk, ``rows(start, stop)``): the rule on a chunk of query rows
    against every key, (stop - start, n * bs) bool. Rows < ``skip_rows`` (computed
    elsewhere: global query rows) and the filler positions past T read only themselves."""
    n = -(-t // bs)
    tp = n * bs
    chunk = max(1, (1 << 22) // (tp * bs)) * bs  # rows per evaluation, ~4M booleans
    k_pos = torch.arange(tp, device=device)

    def rows(start: int, stop: int) -> Tensor:
        q_pos = torch.arange(start, stop, device=device)
        inside = (q_pos[:, None] < t) & (k_pos[None, :] < t) & (q_pos[:, None] >= skip_rows)
        ok = rule(q_pos.clamp(max=t - 1)[:, None], k_pos.clamp(max=t - 1)[None, :]) & inside
        return ok | ((q_pos[:, None] == k_pos[None, :]) & ~inside.any(1, keepdim=True))

    return n, chunk, rows


def tile_reads(rule, t: int, bs: int, skip_rows: int = 0, device: torch.device | str = "cpu") -> Tensor:
    """(n, n) bool: the key tiles of ``bs`` tokens each query tile reads under the rule,
    evaluated a chunk of query rows at a time: never a T x T mask."""
    n, chunk, rows = _rule_rows(rule, t, bs, skip_rows, device)
    return torch.cat([rows(s, min(s + chunk, n * bs)).view(-1, bs, n, bs).any(dim=(1, 3))
                      for s in range(0, n * bs, chunk)])


def tiles(rule, t: int, bs: int, skip_rows: int = 0, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Key tiles of each query tile for the rule ``rule(q, k)`` at length ``t``: ``idx``
    (n, K) and the in-tile mask ``inblock`` (n, bs, K * bs), K the most tiles a query
    tile reads (short lists padded with the query's own tile, masked out)."""
    n, chunk, rows = _rule_rows(rule, t, bs, skip_rows, device)
    reads = tile_reads(rule, t, bs, skip_rows, device)  # (n, n)
    count = reads.sum(1, keepdim=True)  # (n, 1)
    k = int(count.max())
    order = torch.sort((~reads).to(torch.int8), dim=1, stable=True).indices[:, :k]  # (n, K): read tiles first
    real = torch.arange(k, device=device)[None, :] < count  # (n, K)
    idx = torch.where(real, order, torch.arange(n, device=device)[:, None].expand(n, k))
    parts = []
    for s in range(0, n * bs, chunk):
        block = rows(s, min(s + chunk, n * bs)).view(-1, bs, n, bs)  # (c, bs, n, bs)
        here = torch.arange(s // bs, s // bs + block.shape[0], device=device)
        sel = block.permute(0, 2, 1, 3)[torch.arange(block.shape[0], device=device)[:, None], idx[here]]
        parts.append(sel & real[here][:, :, None, None])  # (c, K, bs, bs)
    inblock = torch.cat(parts).permute(0, 2, 1, 3).reshape(n, bs, k * bs)
    return idx, inblock


class PatternAttention:
    """One layer's pattern and its cached layouts; called in place of SDPA by
    ``blocks.SelfAttention``. ``kernel``: auto | blocks | dense | flex (config.AttentionConfig)."""

    def __init__(self, pattern: Pattern, kernel: str = "auto"):
        self.pattern = pattern
        self.kernel = kernel
        self._layouts: dict[tuple, Layout] = {}

    def __repr__(self) -> str:
        return f"PatternAttention({self.pattern}, kernel={self.kernel!r})"

    # ------------------------------------------------------------ layouts
    def layout(self, t: int, causal: bool, device: torch.device | str = "cpu", grad: bool = True,
               kernel: str | None = None) -> Layout:
        """The cached layout of length ``t`` (built on first use)."""
        device = torch.device(device)
        kernel = kernel or self._choose(device, grad)
        key = (t, causal, device, kernel)
        if key not in self._layouts:
            self._layouts[key] = self._build(t, causal, device, kernel)
        return self._layouts[key]

    def _choose(self, device: torch.device, grad: bool) -> str:
        if self.kernel != "auto":
            if self.kernel == "flex" and device.type == "cpu" and grad:
                raise RuntimeError("attention.kernel = 'flex': FlexAttention has no backward pass on CPU "
                                   "(torch 2.13); use auto, blocks or dense")
            return self.kernel
        if self.pattern.kind == "prefix":
            return "dense"
        return "flex" if device.type == "cuda" else "blocks"

    def _build(self, t: int, causal: bool, device: torch.device, kernel: str) -> Layout:
        if kernel == "dense":
            return Layout("dense", t, pairs=t * t, dense=self.pattern.dense(t, causal, device))
        if kernel == "flex":
            return self._flex_layout(t, causal, device)
        bs = min(self.pattern.block_size, t)
        g = self.pattern.global_rows(causal)
        idx, inblock = tiles(self.pattern.rule(t, causal, device), t, bs, skip_rows=g, device=device)
        n, k = idx.shape
        pairs = n * bs * k * bs + g * t
        if self.kernel == "auto" and 2 * pairs > t * t:  # the tiles would compute over half of T x T: dense is cheaper
            return self._build(t, causal, device, "dense")
        return Layout("blocks", t, pairs=pairs, block=bs, idx=idx, inblock=inblock,
                      global_rows=g)

    def _flex_layout(self, t: int, causal: bool, device: torch.device) -> Layout:
        """FlexAttention's BlockMask: the 128-token tiles each query tile reads (from the
        rule, chunk by chunk), every one of them partial (the mask_mod runs in each, so a
        batch's padding can be added to it)."""
        from torch.nn.attention.flex_attention import BlockMask

        rule = self.pattern.rule(t, causal, device)
        reads = tile_reads(rule, t, FLEX_BLOCK, 0, device)  # (n, n)
        count = reads.sum(1).to(torch.int32)  # (n,)
        order = torch.sort((~reads).to(torch.int8), dim=1, stable=True).indices.to(torch.int32)  # (n, n)
        mask = BlockMask.from_kv_blocks(count[None, None], order[None, None], BLOCK_SIZE=FLEX_BLOCK,
                                        mask_mod=lambda b, h, q, k: rule(q, k), seq_lengths=(t, t))
        return Layout("flex", t, pairs=int(count.sum()) * FLEX_BLOCK * FLEX_BLOCK, block_mask=mask)

    def pairs(self, t: int, causal: bool, device: torch.device | str = "cpu") -> int:
        """Query-key pairs per row and head the layer's kernel computes at length ``t``."""
        return self.layout(t, causal, device).pairs

    # ------------------------------------------------------------ running
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, attention: Attention, dropout_p: float = 0.0) -> Tensor:
        """q, k, v (B, H, T, Dh) under the pattern, ``attention.causal`` and its padding
        mask (``Attention(mask=padding(valid))``) -> (B, H, T, Dh)."""
        t = q.shape[2]
        valid, other = _split_mask(attention.mask)
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        lay = self.layout(t, attention.causal, q.device, grad)
        if other is not None:  # a mask that is not padding: the dense rule AND it
            lay = self.layout(t, attention.causal, q.device, kernel="dense")
        elif lay.kernel == "flex" and dropout_p > 0:  # FlexAttention has no attention dropout
            lay = self.layout(t, attention.causal, q.device, kernel="blocks")
        if lay.kernel == "blocks":
            return _run_blocks(q, k, v, lay, valid, dropout_p)
        if lay.kernel == "flex":
            return _run_flex(q, k, v, lay, valid)
        mask = lay.dense if valid is None else lay.dense & padding_pairs(valid[:, None, :, None], valid[:, None, None, :])
        if other is not None:
            mask = mask & other
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def _split_mask(mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """An ``Attention.mask`` as (valid keys (B, T), any other mask): the data pipeline's
    masks are padding masks (B, 1, 1, T); anything else is ANDed densely."""
    if mask is None:
        return None, None
    if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
        return mask[:, 0, 0, :], None
    return None, mask


def _run_blocks(q: Tensor, k: Tensor, v: Tensor, lay: Layout, valid: Tensor | None, dropout_p: float) -> Tensor:
    """Each query tile against its K key tiles: the tiles gathered by ``index_select``
    (whose backward is one ``index_add``), heads and tiles folded into SDPA's batch axis
    ((B, H * n, bs, Dh) against (B, H * n, K * bs, Dh)), so the fused CPU kernel runs."""
    b, h, t, d = q.shape
    bs = lay.block
    n, kk = lay.idx.shape
    fill = n * bs - t
    qp, kp, vp = (F.pad(z, (0, 0, 0, fill)) if fill else z for z in (q, k, v))  # (B, H, n*bs, Dh)
    flat = lay.idx.flatten()  # (n * K,)
    qb = qp.reshape(b, h * n, bs, d)
    kb = kp.reshape(b, h, n, bs, d).index_select(2, flat).reshape(b, h * n, kk * bs, d)
    vb = vp.reshape(b, h, n, bs, d).index_select(2, flat).reshape(b, h * n, kk * bs, d)
    if valid is None:
        mask = lay.heads_mask(h)  # (1, H * n, bs, K*bs), cached
    else:
        vpad = F.pad(valid, (0, fill)) if fill else valid  # (B, n*bs), filler invalid
        tile_valid = vpad.view(b, n, bs)
        key_valid = tile_valid.index_select(1, flat).reshape(b, n, 1, kk * bs)  # (B, n, 1, K*bs)
        mask = lay.inblock & padding_pairs(tile_valid[:, :, :, None], key_valid)  # (B, n, bs, K*bs)
        mask = mask[:, None].expand(b, h, n, bs, kk * bs).reshape(b, h * n, bs, kk * bs)
    y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=dropout_p)
    y = y.reshape(b, h, n * bs, d)[:, :, :t]  # (B, H, T, Dh)
    g = lay.global_rows
    if g:  # global queries read every key
        gmask = None if valid is None else padding_pairs(valid[:, None, :g, None], valid[:, None, None, :])
        yg = F.scaled_dot_product_attention(q[:, :, :g], k, v, attn_mask=gmask, dropout_p=dropout_p)
        y = torch.cat([yg, y[:, :, g:]], dim=2)
    return y


_compiled_flex = None


def _run_flex(q: Tensor, k: Tensor, v: Tensor, lay: Layout, valid: Tensor | None) -> Tensor:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    global _compiled_flex
    mask = lay.block_mask
    if valid is not None:  # the cached block lists, the batch's padding in the mask_mod
        base = mask.mask_mod

        last = lay.t - 1

        def with_padding(b, h, q_idx, k_idx):  # indices past t (the kernel's padding) clamped
            return base(b, h, q_idx, k_idx) & padding_pairs(valid[b, q_idx.clamp(max=last)], valid[b, k_idx.clamp(max=last)])

        mask = BlockMask.from_kv_blocks(mask.kv_num_blocks, mask.kv_indices, BLOCK_SIZE=FLEX_BLOCK,
                                        mask_mod=with_padding, seq_lengths=(lay.t, lay.t))
    if q.device.type == "cpu":  # no gradients here (see _choose): the eager reference
        return flex_attention(q, k, v, block_mask=mask)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex(q, k, v, block_mask=mask)
