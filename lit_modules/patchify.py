"""Patches and tubelets: position tables, (un)patchify, gathering, per-patch pixel
normalisation, and stacking masked views. Shared by the image and video families.

Axis letters as in ``masking/__init__.py``; patches and tubelets are flattened
row-major, (y, x) and (t, y, x).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .masking import MaskedBatch


def normalize_patches(t: Tensor) -> Tensor:
    """Each patch (last dim) to zero mean and unit variance: MAE's ``norm_pix_loss`` target."""
    return (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()


def stack_views(views) -> MaskedBatch:
    """Masked views of one image or clip batch (no attention tensors), stacked along the
    batch: K evaluation masks become one batch of K * B rows."""
    first = views[0]
    return MaskedBatch(
        inputs=torch.cat([v.inputs for v in views]), targets=torch.cat([v.targets for v in views]),
        loss_mask=torch.cat([v.loss_mask for v in views]), attention=first.attention,
        keep_idx=torch.cat([v.keep_idx for v in views]), ratio=first.ratio,
        actions=None if first.actions is None else torch.cat([v.actions for v in views]),
    )


def head(masked: MaskedBatch, n: int) -> MaskedBatch:
    """The first ``n`` rows of a masked image or clip view."""
    return dataclasses.replace(masked, inputs=masked.inputs[:n], targets=masked.targets[:n],
                               loss_mask=masked.loss_mask[:n], keep_idx=masked.keep_idx[:n],
                               actions=None if masked.actions is None else masked.actions[:n])


def sincos_2d(width: int, grid: tuple[int, int]) -> Tensor:
    """Fixed 2-D sin-cos position embeddings (N, D): half the channels encode the row,
    half the column, each as sin/cos at geometric frequencies (MAE's get_2d_sincos)."""
    assert width % 4 == 0, "sin-cos 2-D embedding needs width divisible by 4"
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width / 4))

    def emb(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega[None]  # (N, D/4)
        return torch.cat([out.sin(), out.cos()], dim=1)  # (N, D/2)

    return torch.cat([emb(ys), emb(xs)], dim=1).float()  # (N, D)


def patchify(images: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches in row-major order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, p: int, grid: tuple[int, int], c: int = 3) -> Tensor:
    """(B, N, p*p*C) -> (B, C, H, W)."""
    b = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, gh * p, gw * p)


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, N, D), idx (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


def sincos_3d(width: int, grid: tuple[int, int, int]) -> Tensor:
    """(N, D): 2-D spatial sin-cos plus 1-D temporal sin-cos, (t, y, x) order."""
    t, h, w = grid
    spatial = sincos_2d(width, (h, w))  # (h*w, D)
    omega = 1.0 / 10000 ** (torch.arange(width // 2, dtype=torch.float64) / (width / 2))
    ang = torch.arange(t, dtype=torch.float64)[:, None] * omega[None]
    temporal = torch.cat([ang.sin(), ang.cos()], dim=1).float()  # (t, D)
    return (temporal[:, None, :] + spatial[None]).reshape(t * h * w, width)


def tubelets(clips: Tensor, tf: int, p: int) -> Tensor:
    """(B, F, C, H, W) -> (B, N, tf*p*p*C) in (t, y, x) order."""
    b, f, c, h, w = clips.shape
    x = clips.reshape(b, f // tf, tf, c, h // p, p, w // p, p)
    x = x.permute(0, 1, 4, 6, 2, 5, 7, 3)  # (B, t, y, x, tf, p, p, C)
    return x.reshape(b, (f // tf) * (h // p) * (w // p), tf * p * p * c)


def untubelets(x: Tensor, tf: int, p: int, grid: tuple[int, int, int], c: int = 3) -> Tensor:
    """(B, N, tf*p*p*C) -> (B, F, C, H, W), the inverse of ``tubelets``."""
    b = x.shape[0]
    t, h, w = grid
    x = x.reshape(b, t, h, w, tf, p, p, c).permute(0, 1, 4, 7, 2, 5, 3, 6)  # (B, t, tf, C, h, p, w, p)
    return x.reshape(b, t * tf, c, h * p, w * p)
