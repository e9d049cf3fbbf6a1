"""The base of the patch-model families (MAE on images, VideoMAE and MaskViT on clips):
what they share around the network.

- the masked step: the loss over the masked views a step receives (one in training,
  the K evaluation masks in validation), logged as ``recon_loss``, and the mask ratio
  each training step was drawn at (``train/mask_ratio``);
- layer removal on the K evaluation masks stacked into one batch, with every encoder
  token compared between blocks (an encoder's tokens are the visible patches, not the
  scored ones);
- a picture per validation (reconstructions or frame strips) sent to the logger.

A family implements ``view_loss(masked) -> (sum, count)`` and, for pictures,
``validation_image(item)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import MaskedModelBase, at_least_one
from .masking import MaskedBatch
from .masking.attention import Attention
from .masking.plan import EvalItem
from .patchify import stack_views


class PatchModelBase(MaskedModelBase):
    recon_metric = "recon_loss"

    def view_loss(self, masked: MaskedBatch) -> tuple[Tensor, Tensor]:
        """Sum of the masked positions' losses and their count, for one masked view."""
        raise NotImplementedError

    def masked_loss(self, views, stage: str):
        """Mean loss over the masked positions of ``views``, and the step's metrics."""
        total = count = 0.0
        for v in views:
            s, n = self.view_loss(v)
            total, count = total + s, count + n
        loss = total / at_least_one(count)  # the count stays on the device (no host sync)
        metrics = {self.recon_metric: (loss.detach(), count)}
        if stage == "train":
            # The ratio this step trained on, made on the device (a filled scalar: no copy to wait for).
            metrics["mask_ratio"] = (torch.full((), views[0].ratio, device=loss.device), 1)
        return loss, metrics

    # ------------------------------------------------------------ layer removal
    def ablation_batch(self, item: EvalItem) -> MaskedBatch:
        """The K evaluation masks, stacked along the batch."""
        return stack_views(item.common)

    def ablation_token_mask(self, masked: MaskedBatch, h: Tensor) -> Tensor:
        """Every encoder token is compared between blocks."""
        return torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)

    # ------------------------------------------------------------ pictures
    def validation_image(self, item: EvalItem) -> Tensor | None:
        """(3, H, W) in [0, 1] to log after each validation, or None."""
        return None

    def on_validation_epoch_end(self) -> None:
        log_image = getattr(self.logger, "log_image", None)
        dm = getattr(self.trainer, "datamodule", None)
        if log_image is None or dm is None or self.trainer.sanity_checking:
            return
        with torch.no_grad():
            image = self.validation_image(next(iter(dm.val_dataloader())).to(self.device))
        if image is not None:
            log_image(f"reconstructions/step_{self.global_step:06d}.png", image, self.global_step)


class ImageEncoderFeatures:
    """What the image families whose encoder reads ``[cls; patches]`` share (MAE, BEiT):
    the frozen features of the old probe and the transfer hooks. A mixin placed before
    ``PatchModelBase``; ``self.model`` has ``embed(images, None)`` (the whole image, no
    patch masked), ``blocks`` and the final norm ``norm``."""

    @torch.no_grad()
    def features(self, images: Tensor, blocks: int | None = None) -> Tensor:
        """Frozen features (B, D): mean of the patch tokens of the unmasked image after
        the first ``blocks`` encoder blocks (all by default) and the final norm."""
        h = self.model.embed(images, None)
        for block in list(self.model.blocks)[: len(self.model.blocks) if blocks is None else blocks]:
            h = block(h, Attention())
        return self.model.norm(h)[:, 1:].mean(1)

    def transfer_embed(self, images: Tensor) -> tuple[Tensor, Attention, None]:
        """The whole image (no patch masked): [cls; patches]."""
        return self.model.embed(images, None), Attention(), None

    def transfer_pool(self, normed: Tensor, ctx) -> dict[str, Tensor]:
        """mean: of the patch tokens (the probe of ``features``); cls: the class token."""
        return {"mean": normed[:, 1:].mean(1), "cls": normed[:, 0]}

    def transfer_norm(self, h: Tensor) -> Tensor:
        return self.model.norm(h)
