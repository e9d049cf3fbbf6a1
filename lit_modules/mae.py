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

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import MaskedModelBase
from .blocks import Block, init_weights, run_blocks
from .config_errors import ConfigError
from .masking import MaskedBatch
from .masking.attention import Attention
from .model_configs import MAEConfig
from .registry import MODELS


@dataclass(frozen=True)
class PatchBatch(MaskedBatch):
    """MaskedBatch of an image batch: inputs (B, 3, H, W) images, targets (B, N, P)
    patch pixels, loss_mask (B, N) True = masked; keep_idx (B, N_keep) visible patches."""

    keep_idx: Tensor | None = None
    ratio: float | None = None  # the mask ratio the masks were drawn at


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
        full = self.mask_token.expand(b, self.n_patches, dd).clone()  # (B, N, Dd)
        full.scatter_(1, keep_idx[..., None].expand(-1, -1, dd), y[:, 1:])
        z = torch.cat([y[:, :1], full + self.dec_pos[None]], dim=1)
        z = self.decoder_norm(run_blocks(self.decoder_blocks, z, Attention()))
        return self.decoder_pred(z[:, 1:])

    def target(self, images: Tensor) -> Tensor:
        t = patchify(images, self.cfg.patch_size)
        if self.cfg.norm_pix_loss:
            mean, var = t.mean(-1, keepdim=True), t.var(-1, keepdim=True)
            t = (t - mean) / (var + 1e-6).sqrt()
        return t

    @staticmethod
    def loss_sums(pred: Tensor, target: Tensor, masked: Tensor) -> tuple[Tensor, Tensor]:
        """Sum over masked patches of the per-patch MSE, and their count."""
        per_patch = ((pred.float() - target.float()) ** 2).mean(-1)  # (B, N)
        m = masked.to(per_patch.dtype)
        return (per_patch * m).sum(), m.sum()


@MODELS.register("mae")
class LitMAE(MaskedModelBase):
    """Masked autoencoder on image patches; the encoder sees visible patches only."""

    Config = MAEConfig

    def __init__(self, config: dict):
        super().__init__(config)
        self.model = MAE(self.run_config.model)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    # ------------------------------------------------------------ masking
    def mask(self, batch: dict, stage: str, k: int = 0) -> PatchBatch:
        from .masking.mlm import eval_mask_indices

        if stage == "train":
            index, (step, total) = self.global_step, self.schedule_clock()
        else:
            index, step, total = eval_mask_indices(self.run_config.model.eval_masks)[k], None, None
        pm = self.masking(batch["keys"], self.run_config.model.grid, seed=self.run_config.seed, mask_index=index,
                          step=step, total_steps=total, stage=stage)
        images = batch["images"]
        return PatchBatch(inputs=images, targets=self.model.target(images), loss_mask=pm.masked,
                          attention=Attention(), keep_idx=pm.keep_idx, ratio=pm.ratio)

    def _shared_step(self, batch: dict, stage: str):
        views = [self.mask(batch, "train")] if stage == "train" else [
            self.mask(batch, stage, k) for k in range(self.run_config.model.eval_masks)]
        total = count = 0.0
        for v in views:
            pred = self.model.decode(self.model.encode(v.inputs, v.keep_idx), v.keep_idx)
            s, n = self.model.loss_sums(pred, v.targets, v.loss_mask)
            total, count = total + s, count + n
        loss = total / max(float(count), 1.0)
        metrics = {"recon_loss": (loss.detach(), int(count))}
        if stage == "train":
            metrics["mask_ratio"] = (torch.tensor(views[0].ratio), 1)  # the ratio this step trained on
        return loss, metrics

    # ------------------------------------------------------------ layer removal
    def ablation_batch(self, batch: dict) -> PatchBatch:
        views = [self.mask(batch, "val", k) for k in range(self.run_config.model.eval_masks)]
        return PatchBatch(
            inputs=torch.cat([v.inputs for v in views]), targets=torch.cat([v.targets for v in views]),
            loss_mask=torch.cat([v.loss_mask for v in views]), attention=Attention(),
            keep_idx=torch.cat([v.keep_idx for v in views]),
        )

    def ablation_embed(self, masked: PatchBatch) -> Tensor:
        return self.model.embed(masked.inputs, masked.keep_idx)

    def ablation_token_mask(self, masked: PatchBatch, h: Tensor) -> Tensor:
        """Tokens whose block-to-block similarity is measured: all encoder tokens."""
        return torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)

    def ablation_score(self, h: Tensor, masked: PatchBatch) -> dict[str, tuple[Tensor, Tensor]]:
        """Encoder truncated at h (final norm applied), the decoder kept."""
        pred = self.model.decode(self.model.norm(h), masked.keep_idx)
        s, n = self.model.loss_sums(pred, masked.targets, masked.loss_mask)
        return {"recon_loss": (s, n)}

    # ------------------------------------------------------------ representations
    @torch.no_grad()
    def features(self, images: Tensor, blocks: int | None = None) -> Tensor:
        """Frozen features (B, D): mean of the patch tokens of the unmasked image after
        the first ``blocks`` encoder blocks (all by default) and the final norm."""
        h = self.model.embed(images, None)
        for block in list(self.model.blocks)[: len(self.model.blocks) if blocks is None else blocks]:
            h = block(h, Attention())
        return self.model.norm(h)[:, 1:].mean(1)

    @torch.no_grad()
    def reconstruction_grid(self, batch: dict, n: int = 8) -> Tensor:
        """Rows original | masked | reconstruction | reconstruction with the visible
        patches pasted back, for the first n validation images: (4n... ) as (3, 4H, nW)
        in [0, 1], mask index = the first evaluation mask."""
        v = self.mask({k: t[:n] for k, t in batch.items()}, "val", 0)
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

    def on_validation_epoch_end(self) -> None:
        log_image = getattr(self.logger, "log_image", None)
        dm = getattr(self.trainer, "datamodule", None)
        if log_image is None or dm is None or self.trainer.sanity_checking:
            return
        batch = next(iter(dm.val_dataloader()))
        batch = {k: t.to(self.device) for k, t in batch.items()}
        img = self.reconstruction_grid(batch)
        log_image(f"reconstructions/step_{self.global_step:06d}.png", img, self.global_step)
