"""Video masked models (VideoMAE / MaskViT) and their autoregressive fine-tuning.

A clip is cut into tubelets of ``tubelet_frames`` x ``patch_size`` x ``patch_size``
(2 x 16 x 16 by default) on a (F', h, w) grid, flattened in (t, y, x) order; positions
are fixed sin-cos embeddings, spatial (2-D) plus temporal (1-D); attention is joint over
space and time. Two kinds of clip:

- ``pixels``: (B, F, 3, H, W). Stage ``pretrain`` is VideoMAE: the encoder sees the
  visible tubelets only, a light decoder inserts mask tokens and predicts the pixels of
  every tubelet; MSE on the masked ones (``norm_pix_loss`` optional).
- ``tokens``: (B, F, h, w) integer ids from a discrete tokenizer (world-model datasets).
  Stage ``pretrain`` is MaskViT: every position enters the encoder, masked ones as a
  learned [MASK] embedding; cross-entropy at the masked positions.

Stage ``two-stage`` runs both in one run: masked pretraining for ``pretrain_steps``
steps, then autoregressive fine-tuning for the rest (``pretrain_steps: 0`` is
autoregressive training from scratch at the same number of steps: the baseline).

Stage ``autoregressive``: no masking; frame-causal attention (a token of time step t sees
time steps <= t) and each token predicts the token at the same place one time step later
(pixels: MSE; tokens: cross-entropy). It starts from a stage-1 checkpoint
(``init_from``): the embeddings and encoder blocks are loaded, a mismatch is an error
listing the mismatched shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import MaskedModelBase
from .blocks import Block, init_weights, run_blocks
from .checkpoints import load_checkpoint
from .config_errors import ConfigError
from .mae import PatchBatch, gather_rows, sincos_2d
from .masking.attention import Attention, frame_causal
from .masking.video import next_frame_loss_mask
from .model_configs import VideoConfig
from .registry import MODELS


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


class VideoNet(nn.Module):
    def __init__(self, cfg: VideoConfig):
        super().__init__()
        self.cfg = cfg
        n = cfg.grid[0] * cfg.grid[1] * cfg.grid[2]
        if cfg.clip_kind == "pixels":
            k = (cfg.tubelet_frames, cfg.patch_size, cfg.patch_size)
            self.embed_in = nn.Conv3d(3, cfg.width, kernel_size=k, stride=k)
            out = cfg.tubelet_frames * cfg.patch_size**2 * 3
        else:
            self.embed_in = nn.Embedding(cfg.vocab_size + 1, cfg.width)  # id vocab_size = [MASK]
            out = cfg.vocab_size
        self.register_buffer("pos", sincos_3d(cfg.width, cfg.grid), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        if cfg.stage != "pretrain":  # next-frame head of the autoregressive stage
            self.ar_head = nn.Linear(cfg.width, out)
        if cfg.stage != "autoregressive" and cfg.clip_kind == "pixels":
            self.decoder_embed = nn.Linear(cfg.width, cfg.decoder_width)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_width))
            self.register_buffer("dec_pos", sincos_3d(cfg.decoder_width, cfg.grid), persistent=False)
            self.decoder_blocks = nn.ModuleList(Block(cfg.decoder_width, cfg.decoder_heads)
                                                for _ in range(cfg.decoder_depth))
            self.decoder_norm = nn.LayerNorm(cfg.decoder_width)
            self.head = nn.Linear(cfg.decoder_width, out)
        elif cfg.stage != "autoregressive":
            self.head = nn.Linear(cfg.width, out)
        init_weights(self, cfg.depth)
        if hasattr(self, "mask_token"):
            nn.init.normal_(self.mask_token, std=0.02)
        self.n = n

    def tokens_in(self, x: Tensor, masked: Tensor | None = None) -> Tensor:
        """Clip -> (B, N, D) embeddings + positions (token clips: masked ids -> [MASK])."""
        if self.cfg.clip_kind == "pixels":
            b, f, c, h, w = x.shape
            e = self.embed_in(x.transpose(1, 2)).flatten(2).transpose(1, 2)  # (B, N, D)
        else:
            ids = x.flatten(1)  # (B, N)
            if masked is not None:
                ids = torch.where(masked, torch.full_like(ids, self.cfg.vocab_size), ids)
            e = self.embed_in(ids)
        return e + self.pos[None]

    def decode(self, latent: Tensor, keep_idx: Tensor) -> Tensor:
        """VideoMAE decoder: latent (B, N_keep, D) -> predictions of every tubelet (B, N, P)."""
        y = self.decoder_embed(latent)
        b, dd = y.shape[0], y.shape[-1]
        full = self.mask_token.expand(b, self.n, dd).clone()
        full.scatter_(1, keep_idx[..., None].expand(-1, -1, dd), y)
        z = run_blocks(self.decoder_blocks, full + self.dec_pos[None], Attention())
        return self.head(self.decoder_norm(z))


@MODELS.register("video")
class LitVideo(MaskedModelBase):
    """Video masked model (pixels or token clips), or its autoregressive fine-tuning."""

    Config = VideoConfig

    def __init__(self, config: dict):
        super().__init__(config)
        self.model = VideoNet(self.run_config.model)
        self._loaded_init = False

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    @property
    def cfg(self) -> VideoConfig:
        return self.run_config.model

    # ------------------------------------------------------------ stage-1 weights
    def load_pretrained(self, path: str) -> list[str]:
        """Load the embeddings and encoder blocks of a stage-1 checkpoint; returns the
        names loaded. Mismatched shapes are a ConfigError listing them."""
        state = load_checkpoint(path, "model.init_from").get("state_dict")
        if not isinstance(state, dict):
            raise ConfigError("model.init_from", path, "has no state_dict: not a Lightning checkpoint")
        own = self.state_dict()
        shared = [k for k in state if k.startswith(("model.embed_in", "model.blocks", "model.norm"))]
        bad = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shared
               if k in own and state[k].shape != own[k].shape]
        missing = [k for k in own if k.startswith(("model.embed_in", "model.blocks", "model.norm")) and k not in state]
        if bad or missing:
            detail = "; ".join(bad + [f"{k} missing" for k in missing])
            raise ConfigError("model.init_from", path, f"does not fit this model: {detail}")
        self.load_state_dict({k: state[k] for k in shared}, strict=False)
        self._loaded_init = True
        return shared

    def on_fit_start(self) -> None:
        if self.cfg.init_from and not self._loaded_init and self.global_step == 0:
            self.load_pretrained(self.cfg.init_from)

    # ------------------------------------------------------------ masking and losses
    def _clip(self, batch: dict) -> Tensor:
        return batch["clips"] if self.cfg.clip_kind == "pixels" else batch["tokens"]

    def mask(self, batch: dict, stage: str, k: int = 0) -> PatchBatch:
        from .masking.mlm import eval_mask_indices

        if stage == "train":
            index, (step, total) = self.global_step, self.schedule_clock()
        else:
            index, step, total = eval_mask_indices(self.cfg.eval_masks)[k], None, None
        pm = self.masking(batch["keys"], self.cfg.grid, seed=self.run_config.seed, mask_index=index, step=step,
                          total_steps=total, stage=stage)
        clip = self._clip(batch)
        return PatchBatch(inputs=clip, targets=self._targets(clip), loss_mask=pm.masked, attention=Attention(),
                          keep_idx=pm.keep_idx, ratio=pm.ratio)

    def masked_steps(self) -> tuple[int, int]:
        """Two-stage runs train on masks for the first ``pretrain_steps`` steps only."""
        last = self.run_config.trainer.max_steps - 1
        if self.cfg.stage == "two-stage":
            last = min(last, self.cfg.pretrain_steps - 1)
        return 0, last

    def _targets(self, clip: Tensor) -> Tensor:
        if self.cfg.clip_kind == "tokens":
            return clip.flatten(1)  # (B, N)
        t = tubelets(clip, self.cfg.tubelet_frames, self.cfg.patch_size)
        if self.cfg.norm_pix_loss:
            t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
        return t

    def _loss_sums(self, out: Tensor, target: Tensor, scored: Tensor) -> tuple[Tensor, Tensor]:
        m = scored.float()
        if self.cfg.clip_kind == "tokens":
            ce = F.cross_entropy(out.flatten(0, 1).float(), target.flatten(), reduction="none").view_as(m)
            return (ce * m).sum(), m.sum()
        return ((((out.float() - target.float()) ** 2).mean(-1)) * m).sum(), m.sum()

    def _pretrain_out(self, v: PatchBatch, h: Tensor | None = None) -> Tensor:
        """Predictions (B, N, P | V) from the encoder output h (default: run it)."""
        if self.cfg.clip_kind == "pixels":
            if h is None:
                h = run_blocks(self.blocks, gather_rows(self.model.tokens_in(v.inputs), v.keep_idx), Attention())
            return self.model.decode(self.model.norm(h), v.keep_idx)
        if h is None:
            h = run_blocks(self.blocks, self.model.tokens_in(v.inputs, v.loss_mask), Attention())
        return self.model.head(self.model.norm(h))

    def _ar_batch(self, batch: dict) -> PatchBatch:
        """All tokens in; token (t, y, x) predicts (t+1, y, x); the last step is not scored."""
        clip = self._clip(batch)
        target = self._targets(clip)  # (B, N, ...)
        _, h, w = self.cfg.grid
        s = h * w
        shifted = torch.cat([target[:, s:], target[:, :s]], dim=1)  # position i -> target of i + s
        scored = next_frame_loss_mask(target.shape[0], self.cfg.grid, target.device)
        return PatchBatch(inputs=clip, targets=shifted, loss_mask=scored,
                          attention=Attention(mask=frame_causal(self.cfg.grid, clip.device)))

    def _ar_out(self, v: PatchBatch, h: Tensor | None = None) -> Tensor:
        if h is None:
            h = run_blocks(self.blocks, self.model.tokens_in(v.inputs), v.attention)
        return self.model.ar_head(self.model.norm(h))

    def phase(self) -> str:
        """What this step trains: "pretrain" or "autoregressive"."""
        if self.cfg.stage == "two-stage":
            return "pretrain" if self.global_step < self.cfg.pretrain_steps else "autoregressive"
        return self.cfg.stage

    def _shared_step(self, batch: dict, stage: str):
        if stage != "train" and self.cfg.stage == "two-stage":
            # Both tasks are validated in a two-stage run; next_frame_loss is the objective.
            loss, metrics = self._ar_step(batch)
            if self.cfg.pretrain_steps > 0:
                metrics.update(self._pretrain_step(batch, stage)[1])
            return loss, metrics
        if self.phase() == "autoregressive":
            loss, metrics = self._ar_step(batch)
            if stage == "train" and self.cfg.stage == "two-stage":
                # Nothing is masked after pretraining; without this the curve would repeat
                # the last pretraining ratio (Lightning keeps a step metric until the epoch ends).
                metrics["mask_ratio"] = (torch.tensor(0.0), 1)
            return loss, metrics
        return self._pretrain_step(batch, stage)

    def _ar_step(self, batch: dict):
        v = self._ar_batch(batch)
        total, count = self._loss_sums(self._ar_out(v), v.targets, v.loss_mask)
        loss = total / max(float(count), 1.0)
        return loss, {"next_frame_loss": (loss.detach(), int(count))}

    def _pretrain_step(self, batch: dict, stage: str):
        views = [self.mask(batch, "train")] if stage == "train" else [
            self.mask(batch, stage, k) for k in range(self.cfg.eval_masks)]
        total = count = 0.0
        for v in views:
            s, n = self._loss_sums(self._pretrain_out(v), v.targets, v.loss_mask)
            total, count = total + s, count + n
        loss = total / max(float(count), 1.0)
        metrics = {"recon_loss": (loss.detach(), int(count))}
        if stage == "train":
            metrics["mask_ratio"] = (torch.tensor(views[0].ratio), 1)  # the ratio this step trained on
        return loss, metrics

    @torch.no_grad()
    def predict_next(self, batch: dict) -> Tensor:
        """Autoregressive stage: predictions (B, N, P | V); position i predicts the token
        one time step later at the same place."""
        return self._ar_out(self._ar_batch(batch))

    # ------------------------------------------------------------ layer removal
    def ablation_batch(self, batch: dict) -> PatchBatch:
        if self.phase() == "autoregressive":
            return self._ar_batch(batch)
        views = [self.mask(batch, "val", k) for k in range(self.cfg.eval_masks)]
        return PatchBatch(
            inputs=torch.cat([v.inputs for v in views]), targets=torch.cat([v.targets for v in views]),
            loss_mask=torch.cat([v.loss_mask for v in views]), attention=Attention(),
            keep_idx=torch.cat([v.keep_idx for v in views]),
        )

    def ablation_embed(self, masked: PatchBatch) -> Tensor:
        if self.phase() == "autoregressive":
            return self.model.tokens_in(masked.inputs)
        if self.cfg.clip_kind == "pixels":
            return gather_rows(self.model.tokens_in(masked.inputs), masked.keep_idx)
        return self.model.tokens_in(masked.inputs, masked.loss_mask)

    def ablation_token_mask(self, masked: PatchBatch, h: Tensor) -> Tensor:
        return torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)

    def ablation_score(self, h: Tensor, masked: PatchBatch) -> dict[str, tuple[Tensor, Tensor]]:
        if self.phase() == "autoregressive":
            s, n = self._loss_sums(self._ar_out(masked, h), masked.targets, masked.loss_mask)
            return {"next_frame_loss": (s, n)}
        s, n = self._loss_sums(self._pretrain_out(masked, h), masked.targets, masked.loss_mask)
        return {"recon_loss": (s, n)}

    # ------------------------------------------------------------ frame strips
    @torch.no_grad()
    def frame_strip(self, batch: dict) -> Tensor | None:
        """(3, rows*H, F*W) in [0, 1] for the first validation clip (pixel clips only).
        Pretraining: original | masked | reconstruction with the visible tubelets pasted
        back. Autoregressive: original | predicted next frames (frame f from frames < f)."""
        if self.cfg.clip_kind != "pixels":
            return None
        one = {k: v[:1] for k, v in batch.items()}
        tf, p, grid = self.cfg.tubelet_frames, self.cfg.patch_size, self.cfg.grid
        raw = tubelets(one["clips"], tf, p)  # (1, N, P) unnormalized pixels
        mean, std = raw.mean(-1, keepdim=True), (raw.var(-1, keepdim=True) + 1e-6).sqrt()
        denorm = (lambda y: y * std + mean) if self.cfg.norm_pix_loss else (lambda y: y)
        if self.phase() == "autoregressive":
            v = self._ar_batch(one)
            pred = denorm(torch.roll(self._ar_out(v), shifts=grid[1] * grid[2], dims=1))  # back to its own step
            t0 = grid[1] * grid[2]
            pred[:, :t0] = raw[:, :t0]  # the first step has no prediction: show it as given
            rows = [raw, pred]
        else:
            v = self.mask(one, "val", 0)
            pred = denorm(self._pretrain_out(v))
            m = v.loss_mask[..., None].float()
            rows = [raw, raw * (1 - m), raw * (1 - m) + pred * m]
        frames = [untubelets(r, tf, p, grid)[0] for r in rows]  # each (F, 3, H, W)
        img = torch.cat([torch.cat(list(f), dim=2) for f in frames], dim=1)  # (3, rows*H, F*W)
        return (img * 0.5 + 0.5).clamp(0, 1)  # the data's (x - 0.5) / 0.5 undone

    def on_validation_epoch_end(self) -> None:
        log_image = getattr(self.logger, "log_image", None)
        dm = getattr(self.trainer, "datamodule", None)
        if log_image is None or dm is None or self.trainer.sanity_checking or self.cfg.clip_kind != "pixels":
            return
        batch = {k: t.to(self.device) for k, t in next(iter(dm.val_dataloader())).items()}
        log_image(f"reconstructions/step_{self.global_step:06d}.png", self.frame_strip(batch), self.global_step)
