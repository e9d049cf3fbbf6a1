"""A patch tokenizer: K visual words learned from a dataset's training patches, for
models that predict discrete tokens of masked patches (BEiT) or of video frames.

**k-means, not a VQ-VAE.** The codebook is k-means (Lloyd's algorithm, k-means++
initialization) on the raw pixel patches in [0, 1], each patch a vector of P * P * 3
numbers. We chose it over a small VQ-VAE because it is deterministic given (data, seed),
fits in seconds on a CPU without a training loop of its own to tune (no codebook
collapse, commitment weight or learning rate), and decodes exactly: a token decodes to
its centroid, the mean of the patches it stands for, so ``decode(encode(x))`` is the
least-squares reconstruction for that assignment. Its price is a coarser codebook than a
learned encoder at the same K (a VQ-VAE's tokens see context, a k-means token sees one
patch); the reported PSNR says how coarse.

Patches are taken un-normalized (the [0, 1] pixels): a token must decode to a patch, so
brightness and colour stay in the vector. Determinism: the training patches are the
first ``max_patches`` of the training images taken in the order of their content keys
(``images.image_keys``), k-means++ draws from a torch Generator seeded by ``seed``, and
ties break by index; the codebook is cached by (those images' keys, options) under
``cache_dir/patch-tokenizer/``, loaded with ``weights_only=True``.

Axis legend: B images, N = (S / P)² patches in row-major order, K codebook size, P the
patch side, D = P * P * 3 numbers per patch.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .patchify import patchify, unpatchify

VERSION = 2  # bump when the fitting changes, so old caches are not reused


@dataclass(frozen=True)
class TokenizerOptions:
    codebook_size: int = 256  # K visual words
    patch_size: int = 8
    max_patches: int = 40000  # training patches k-means sees
    iterations: int = 25  # Lloyd iterations
    seed: int = 0


@dataclass
class PatchTokenizer:
    """``centroids`` (K, D) in [0, 1]; ``stats``: codebook perplexity and PSNR of
    decode(encode(x)) on held-out images, and the PSNR of the mean patch (one word)."""

    centroids: Tensor
    patch_size: int
    stats: dict[str, float]

    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> token ids (B, N) int64: the nearest centroid."""
        return nearest(patchify(images, self.patch_size).float(), self.centroids.to(images.device))

    def decode(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """Token ids (B, N) -> images (B, 3, H, W): each patch its centroid."""
        return unpatchify(self.centroids.to(tokens.device)[tokens], self.patch_size, grid)


def nearest(patches: Tensor, centroids: Tensor, chunk: int = 8192) -> Tensor:
    """(..., D) patches -> (...) index of the nearest centroid (squared distance)."""
    flat = patches.reshape(-1, patches.shape[-1])
    c2 = (centroids * centroids).sum(1)  # (K,)
    out = [(c2[None] - 2 * part @ centroids.T).argmin(1) for part in flat.split(chunk)]  # |x|² is common to a row
    return torch.cat(out).reshape(patches.shape[:-1])


def kmeans(x: Tensor, k: int, iterations: int, seed: int) -> Tensor:
    """Lloyd's k-means with k-means++ initialization: (M, D) -> (K, D). An empty cluster
    takes the point farthest from its centroid."""
    g = torch.Generator().manual_seed(seed)
    m = x.shape[0]
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype)
    centroids[0] = x[torch.randint(m, (1,), generator=g)]
    d2 = ((x - centroids[0]) ** 2).sum(1)  # (M,) distance to the nearest chosen centroid
    for i in range(1, k):
        pick = torch.multinomial(d2.clamp(min=0) + 1e-12, 1, generator=g)
        centroids[i] = x[pick]
        d2 = torch.minimum(d2, ((x - centroids[i]) ** 2).sum(1))
    for _ in range(iterations):
        assign = nearest(x, centroids)  # (M,)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)  # (K,)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp(min=1)[:, None])
        if empty.any():
            err = ((x - centroids[assign]) ** 2).sum(1)
            far = err.topk(int(empty.sum())).indices
            centroids[empty] = x[far]
    return centroids


def psnr(a: Tensor, b: Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]."""
    mse = float(((a - b) ** 2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def training_images(keys: np.ndarray, patches_per_image: int, max_patches: int) -> np.ndarray:
    """Indices of the images k-means reads: the ones with the smallest content keys, in
    key order (stable), enough for ``max_patches`` patches."""
    return np.argsort(keys.astype(np.int64), kind="stable")[: -(-max_patches // patches_per_image)]


def fit(train: np.ndarray, keys: np.ndarray, held_out: np.ndarray, options: TokenizerOptions,
        cache_dir: Path | None) -> PatchTokenizer:
    """The tokenizer of these training images (N, S, S, 3) uint8 (their content ``keys``),
    scored on ``held_out`` images; the codebook from the cache when it has been fit on the
    same images before (the scores are recomputed: the held-out images may differ)."""
    grid = (train.shape[1] // options.patch_size,) * 2
    order = training_images(keys, grid[0] * grid[1], options.max_patches)
    data_hash = hashlib.sha256(keys.astype(np.int64)[order].tobytes()).hexdigest()[:16]
    opts = f"{data_hash}-{train.shape[1]}-{options.codebook_size}-{options.patch_size}-{options.max_patches}-" \
           f"{options.iterations}-{options.seed}-v{VERSION}"
    path = None if cache_dir is None else Path(cache_dir) / "patch-tokenizer" / f"{opts}.pt"
    images = torch.from_numpy(np.ascontiguousarray(train[order])).permute(0, 3, 1, 2).float() / 255
    x = patchify(images, options.patch_size).reshape(-1, 3 * options.patch_size**2)[: options.max_patches]
    if path is not None and path.is_file():
        centroids = torch.load(path, weights_only=True)["centroids"]
    else:
        centroids = kmeans(x, options.codebook_size, options.iterations, options.seed)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save({"centroids": centroids}, tmp)
            tmp.replace(path)  # concurrent workers never read a half-written file
    tok = PatchTokenizer(centroids, options.patch_size, {})
    tok.stats = score(tok, held_out, x.mean(0))
    return tok


def score(tok: PatchTokenizer, held_out: np.ndarray, mean_patch: Tensor) -> dict[str, float]:
    """Codebook perplexity (exp of the entropy of token use, K at most) and the PSNR of
    decode(encode(x)) on held-out images, beside the PSNR of predicting every patch by
    the training patches' mean (a one-word codebook)."""
    images = torch.from_numpy(np.ascontiguousarray(held_out)).permute(0, 3, 1, 2).float() / 255
    grid = (images.shape[2] // tok.patch_size,) * 2
    tokens = tok.encode(images)
    p = torch.bincount(tokens.flatten(), minlength=tok.centroids.shape[0]).double()
    p = p[p > 0] / p.sum()
    mean_images = unpatchify(mean_patch.float().expand(images.shape[0], grid[0] * grid[1], -1), tok.patch_size, grid)
    return {"perplexity": float(torch.exp(-(p * p.log()).sum())), "psnr": psnr(tok.decode(tokens, grid), images),
            "psnr_mean_patch": psnr(mean_images, images), "codebook_size": float(tok.centroids.shape[0])}
