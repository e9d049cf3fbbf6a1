"""Masked autoencoder (MAE, He et al. 2021) on images.

The forward splits as in the reference implementation: **masking** (from
``masking/patches.py``: exact count per image, True = masked), **encoder** (patch
embedding + fixed 2-D sin-cos positions; only the *visible* patches and a class token go
through the blocks), **decoder** (a lighter transformer of its own width and depth: mask
tokens are inserted at the masked positions, every patch is predicted) and **loss** (MSE
on the masked patches only; with ``norm_pix_loss`` each target patch is normalized by
its own mean and variance).

Training masks use mask index = step (a new mask every step, as MAE draws new noise per
batch); validation uses K fixed masks per image at the evaluation ratio. Representation
quality is measured after training by a linear probe on frozen encoder features (see
``probe.py``), also with encoder blocks removed from the back.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .blocks import Block, init_weights, run_blocks
from .config_errors import ConfigError
from .flops import Flops, encoder, first_layer, linear
from .masking import MaskedBatch
from .masking.attention import Attention
from .masking.plan import EvalItem, TrainItem
from .model_configs import MAEConfig
from .patch_base import ImageEncoderFeatures, PatchModelBase
from .patchify import gather_rows, head, normalize_patches, patchify, sincos_2d, unpatchify
from .registry import MODELS


class MAE(nn.Module):
    def __init__(self, cfg: MAEConfig):
        super().__init__()
        self.cfg = cfg
        p, n = cfg.patch_size, cfg.grid[0] * cfg.grid[1]
        self.patch_embed = nn.Conv2d(3, cfg.width, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.register_buffer("pos", sincos_2d(cfg.width, cfg.grid), persistent=False)  # (N, D)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        self.decoder_embed = nn.Linear(cfg.width, cfg.decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_width))
        self.register_buffer("dec_pos", sincos_2d(cfg.decoder_width, cfg.grid), persistent=False)
        self.decoder_blocks = nn.ModuleList(Block(cfg.decoder_width, cfg.decoder_heads)
                                            for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(cfg.decoder_width)
        self.decoder_pred = nn.Linear(cfg.decoder_width, p * p * 3)
        init_weights(self, cfg.depth)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.n_patches = n

    def embed(self, images: Tensor, keep_idx: Tensor | None) -> Tensor:
        """Images (B, 3, H, W) -> [cls; visible patches] (B, 1 + N_keep, D)."""
        if images.shape[-1] != self.cfg.image_size or images.shape[-2] != self.cfg.image_size:
            raise ConfigError("model.image_size", self.cfg.image_size,
                              f"the images are {images.shape[-2]}x{images.shape[-1]}; set it to match data.image_size")
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos[None]  # (B, N, D)
        if keep_idx is not None:
            x = gather_rows(x, keep_idx)  # (B, N_keep, D): the encoder never sees masked patches
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def encode(self, images: Tensor, keep_idx: Tensor | None) -> Tensor:
        """-> latent (B, 1 + N_keep, D), after the final norm."""
        return self.norm(run_blocks(self.blocks, self.embed(images, keep_idx), Attention()))

    def decode(self, latent: Tensor, keep_idx: Tensor) -> Tensor:
        """Latent (B, 1 + N_keep, D) -> pixel predictions of every patch (B, N, P)."""
        y = self.decoder_embed(latent)  # (B, 1 + N_keep, Dd)
        b, dd = y.shape[0], y.shape[-1]
        full = self.mask_token.to(y.dtype).expand(b, self.n_patches, dd).clone()  # (B, N, Dd), autocast dtype
        full.scatter_(1, keep_idx[..., None].expand(-1, -1, dd), y[:, 1:])
        z = torch.cat([y[:, :1], full + self.dec_pos[None]], dim=1)
        z = self.decoder_norm(run_blocks(self.decoder_blocks, z, Attention()))
        return self.decoder_pred(z[:, 1:])

    def target(self, images: Tensor) -> Tensor:
        t = patchify(images, self.cfg.patch_size)
        return normalize_patches(t) if self.cfg.norm_pix_loss else t

    @staticmethod
    def loss_sums(pred: Tensor, target: Tensor, masked: Tensor) -> tuple[Tensor, Tensor]:
        """Sum over masked patches of the per-patch MSE, and their count."""
        per_patch = ((pred.float() - target.float()) ** 2).mean(-1)  # (B, N)
        m = masked.to(per_patch.dtype)
        return (per_patch * m).sum(), m.sum()


@MODELS.register("mae")
class LitMAE(ImageEncoderFeatures, PatchModelBase):
    """Masked autoencoder on image patches; the encoder sees visible patches only."""

    Config = MAEConfig

    def __init__(self, config: dict):
        super().__init__(config)
        self.model = MAE(self.run_config.model)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    def view_loss(self, masked: MaskedBatch) -> tuple[Tensor, Tensor]:
        pred = self.model.decode(self.model.encode(masked.inputs, masked.keep_idx), masked.keep_idx)
        return self.model.loss_sums(pred, self.model.target(masked.targets), masked.loss_mask)

    def _shared_step(self, item: TrainItem | EvalItem, stage: str):
        return self.masked_loss([item.masked] if stage == "train" else item.common, stage)

    def step_flops(self, item: TrainItem) -> tuple[Flops, int]:
        """Patch embedding of every patch; the encoder on [cls] + the visible patches; the
        decoder (its own width and depth) on [cls] + every patch."""
        c = self.run_config.model
        b, keep = item.masked.keep_idx.shape
        n, pixels = self.model.n_patches, 3 * c.patch_size**2
        flops = (first_layer(b * n, pixels, c.width) + encoder(b, 1 + keep, c.width, c.depth)
                 + linear(b * (1 + keep), c.width, c.decoder_width)
                 + encoder(b, 1 + n, c.decoder_width, c.decoder_depth) + linear(b * n, c.decoder_width, pixels))
        return flops, b * n

    # ------------------------------------------------------------ layer removal
    def ablation_embed(self, masked: MaskedBatch) -> Tensor:
        return self.model.embed(masked.inputs, masked.keep_idx)

    def ablation_score(self, h: Tensor, masked: MaskedBatch) -> dict[str, tuple[Tensor, Tensor]]:
        """Encoder truncated at h (final norm applied), the decoder kept."""
        pred = self.model.decode(self.model.norm(h), masked.keep_idx)
        s, n = self.model.loss_sums(pred, self.model.target(masked.targets), masked.loss_mask)
        return {"recon_loss": (s, n)}

    # ------------------------------------------------------------ pictures
    @torch.no_grad()
    def reconstruction_grid(self, item: EvalItem, n: int = 8) -> Tensor:
        """Rows original | masked | reconstruction | reconstruction with the visible
        patches pasted back, for the first n validation images under the first
        evaluation mask: (3, 4H, nW) in [0, 1]."""
        v = head(item.common[0], n)
        images, p, grid = v.inputs, self.run_config.model.patch_size, self.run_config.model.grid
        pred = self.model.decode(self.model.encode(images, v.keep_idx), v.keep_idx)  # (n, N, P)
        orig = patchify(images, p)
        if self.run_config.model.norm_pix_loss:  # undo the per-patch normalization
            mean, var = orig.mean(-1, keepdim=True), orig.var(-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mean
        m = v.loss_mask[..., None].to(orig.dtype)
        rows = [orig, orig * (1 - m) + 0.5 * m, pred, orig * (1 - m) + pred * m]
        rows = [unpatchify(r, p, grid) for r in rows]  # each (n, 3, H, W)
        grid_img = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # (3, 4H, nW)
        lo, hi = grid_img.amin(), grid_img.amax()
        return ((grid_img - lo) / (hi - lo + 1e-8)).clamp(0, 1)

    def validation_image(self, item: EvalItem) -> Tensor:
        return self.reconstruction_grid(item)
