"""BEiT (Bao et al. 2021): masked image modeling on discrete visual tokens.

The forward splits as MAE's: **masking** (``masking/patches.py``; BEiT's block-wise
``mae-block`` at 40% is the family's usual strategy; True = masked), **encoder** (patch
embedding + fixed 2-D sin-cos positions; *every* patch goes through the blocks, a masked
patch's embedding replaced by a learned [MASK] embedding before the position is added,
and a class token in front), **head** (final norm, then a linear layer to the K visual
words, run only at the masked patches: gathered first) and **loss** (cross-entropy on the
masked patches' token ids). The targets are the ids the run's patch tokenizer
(``patch_tokenizer.py``: k-means words of ``patch_size`` patches, fit on the run's
training images, cached) gives each patch of the *unmasked* input image; its codebook is
a buffer of the model, so a checkpoint carries the tokenizer it trained against.

The tokenizer is fit when the model meets its data: ``fit_to_data(datamodule)``, called
by ``run.build_model(cfg, datamodule)`` and by Lightning's ``setup`` hook; it logs its
codebook perplexity and reconstruction PSNR with the run (``tokenizer/*``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import at_least_one
from .blocks import init_weights, make_blocks, run_blocks
from .config_errors import ConfigError
from .flops import Flops, encoder, first_layer, linear
from .masking import MaskedBatch
from .masking.attention import Attention
from .masking.plan import EvalItem, TrainItem, gather_scored
from .model_configs import BEiTConfig
from .patch_base import ImageEncoderFeatures, PatchModelBase
from .patchify import patchify, sincos_2d
from .registry import MODELS


class BEiT(nn.Module):
    """Patch embedding + [MASK] + positions -> blocks -> final norm -> K-way head."""

    def __init__(self, cfg: BEiTConfig):
        super().__init__()
        self.cfg = cfg
        p, n = cfg.patch_size, cfg.grid[0] * cfg.grid[1]
        self.patch_embed = nn.Conv2d(3, cfg.width, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.register_buffer("pos", sincos_2d(cfg.width, cfg.grid), persistent=False)  # (N, D)
        self.blocks = make_blocks(cfg.depth, cfg.width, cfg.heads)
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.codebook_size)
        init_weights(self, cfg.depth)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.n_patches = n

    def embed(self, images: Tensor, masked: Tensor | None) -> Tensor:
        """Images (B, 3, H, W), masked (B, N) bool or None -> [cls; patches] (B, 1 + N, D)."""
        if images.shape[-1] != self.cfg.image_size or images.shape[-2] != self.cfg.image_size:
            raise ConfigError("model.image_size", self.cfg.image_size,
                              f"the images are {images.shape[-2]}x{images.shape[-1]}; set it to match data.image_size")
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, D)
        if masked is not None:
            x = torch.where(masked[..., None], self.mask_token.to(x.dtype), x)
        x = x + self.pos[None]
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)

    def masked_logits(self, h: Tensor, where: Tensor) -> Tensor:
        """Hidden states (B, 1 + N, D) before the final norm -> logits (M, K) at the M
        masked patches (row-major): ``where`` is the (B, N) mask or its listed positions."""
        return self.head(self.norm(gather_scored(h[:, 1:], where)))


@MODELS.register("beit")
class LitBEiT(ImageEncoderFeatures, PatchModelBase):
    """ViT on every patch ([MASK] at the masked ones) predicting their discrete visual tokens."""

    Config = BEiTConfig
    recon_metric = "token_loss"

    def __init__(self, config: dict):
        super().__init__(config)
        c = self.run_config.model
        self.model = BEiT(c)
        # The patch tokenizer's codebook (K, P * P * 3), in checkpoints; zeros until fit.
        self.register_buffer("codebook", torch.zeros(c.codebook_size, 3 * c.patch_size**2))
        self.register_buffer("codebook_fitted", torch.zeros((), dtype=torch.bool))
        self.tokenizer_stats: dict[str, float] = {}
        self._tokenizer_ready = False  # the host's copy of codebook_fitted, read once per fit

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    # ------------------------------------------------------------ the tokenizer
    def fit_to_data(self, dm) -> None:
        """Fit (or load from the cache) the patch tokenizer on the data module's training
        images, scored on its validation images; no-op once fitted."""
        if bool(self.codebook_fitted):
            return
        from .patch_tokenizer import TokenizerOptions, fit

        c = self.run_config.model
        options = TokenizerOptions(codebook_size=c.codebook_size, patch_size=c.patch_size,
                                   max_patches=c.tokenizer_patches, seed=self.run_config.seed)
        from .patch_tokenizer import training_images

        data = dm.data
        pick = dm.train_index[training_images(data.keys[dm.train_index], c.grid[0] * c.grid[1], options.max_patches)]
        tok = fit(data.pixels[pick], data.keys[pick], data.pixels[dm.val_index], options, dm.workspace.cache_dir)
        self.codebook.copy_(tok.centroids)
        self.codebook_fitted.fill_(True)
        self.tokenizer_stats = tok.stats

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None:
            self.fit_to_data(dm)

    def on_fit_start(self) -> None:
        self._tokenizer_ready = bool(self.codebook_fitted)
        if self.tokenizer_stats and self.logger is not None:  # with the run, at step 0
            self.logger.log_metrics({f"tokenizer/{k}": v for k, v in self.tokenizer_stats.items()}, step=0)

    def run_params(self) -> dict[str, object]:
        return {f"tokenizer.{k}": round(v, 4) for k, v in self.tokenizer_stats.items()}

    def targets(self, images: Tensor) -> Tensor:
        """The token id of every patch of the (unmasked) input images: (B, N) int64."""
        if not self._tokenizer_ready and not bool(self.codebook_fitted):  # read once, not every step
            raise RuntimeError("beit: the patch tokenizer is not fit; build the model with its data module "
                               "(run.build_model(cfg, datamodule)) or train it with one")
        from .data.images import denormalize_images
        from .patch_tokenizer import nearest

        # float32 outside autocast: under bf16 the distances would pick other words than the tokenizer's
        with torch.autocast(device_type=images.device.type, enabled=False):
            images = images.float()
            if self.run_config.data.normalize:  # the tokenizer reads [0, 1] pixels
                images = denormalize_images(images)
            return nearest(patchify(images, self.run_config.model.patch_size), self.codebook.float())

    # ------------------------------------------------------------ the masked step
    def _masked_ce(self, h: Tensor, masked: MaskedBatch, where: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Sum of the cross-entropy and of the correct predictions at the masked patches
        (``where``: listed, else the loss mask), their count."""
        where = masked.loss_mask if where is None else where
        logits = self.model.masked_logits(h, where)  # (M, K)
        target = gather_scored(self.targets(masked.targets), where)  # (M,)
        ce = F.cross_entropy(logits.float(), target, reduction="sum")
        return ce, (logits.argmax(-1) == target).sum().float(), masked.loss_mask.sum().float()

    def view_stats(self, masked: MaskedBatch, where: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        h = run_blocks(self.model.blocks, self.model.embed(masked.inputs, masked.loss_mask), Attention())
        return self._masked_ce(h, masked, where)

    def view_loss(self, masked: MaskedBatch) -> tuple[Tensor, Tensor]:
        ce, _, n = self.view_stats(masked)
        return ce, n

    def _shared_step(self, item: TrainItem | EvalItem, stage: str):
        """Mean cross-entropy over the masked patches of the step's view (training) or of
        the K evaluation masks, and the token accuracy."""
        views = [(item.masked, item.where_scored())] if stage == "train" else [(v, None) for v in item.common]
        ce = correct = n = 0.0
        for v, where in views:
            c, a, m = self.view_stats(v, where)
            ce, correct, n = ce + c, correct + a, n + m
        count = at_least_one(n)  # stays on the device (no host sync)
        loss = ce / count
        metrics = {"token_loss": (loss.detach(), n), "token_acc": (correct / count, n)}
        if stage == "train":
            # The ratio this step trained on, made on the device (a filled scalar: no copy to wait for).
            metrics["mask_ratio"] = (torch.full((), views[0][0].ratio, device=loss.device), 1)
        return loss, metrics

    def step_flops(self, item: TrainItem) -> tuple[Flops, int]:
        """Patch embedding of every patch, the encoder on [cls] + every patch, the head at
        the masked patches; and the tokenizer's nearest-word search for the targets
        (every patch against the K words, forward only)."""
        c = self.run_config.model
        b = item.masked.inputs.shape[0]
        n, pixels = self.model.n_patches, 3 * c.patch_size**2
        m = int(item.masked.loss_mask.sum())
        flops = first_layer(b * n, pixels, c.width) + encoder(b, 1 + n, c.width, c.depth) \
            + linear(m, c.width, c.codebook_size) + Flops(nograd=2.0 * b * n * pixels * c.codebook_size)
        return flops, b * n

    # ------------------------------------------------------------ layer removal
    def ablation_embed(self, masked: MaskedBatch) -> Tensor:
        return self.model.embed(masked.inputs, masked.loss_mask)

    def ablation_score(self, h: Tensor, masked: MaskedBatch) -> dict[str, tuple[Tensor, Tensor]]:
        ce, correct, n = self._masked_ce(h, masked)
        return {"token_loss": (ce, n), "token_acc": (correct, n)}
