"""Video masked models and their autoregressive fine-tuning: two families.

A clip is cut into tubelets of ``tubelet_frames`` x ``patch_size`` x ``patch_size`` on a
(F', h, w) grid, flattened in (t, y, x) order; positions are fixed sin-cos embeddings,
spatial (2-D) plus temporal (1-D); attention is joint over space and time.

- ``video-mae`` (``LitVideoMAE``), pixel clips (B, F, 3, H, W), VideoMAE: the encoder
  sees the visible tubelets only, a light decoder inserts mask tokens and predicts the
  pixels of every tubelet; MSE on the masked ones (``norm_pix_loss`` optional).
- ``maskvit`` (``LitMaskViT``), token clips (B, F, h, w) of a discrete tokenizer
  (world-model datasets), MaskViT: every position enters the encoder, masked ones as a
  learned [MASK] embedding; cross-entropy at the masked positions.

Both share the stages (``VideoFamily``): ``pretrain`` (masked pretraining), the
``autoregressive`` stage (``NextFrame``: no masking, frame-causal attention, each token
predicts the token at its place one time step later; MSE on pixels, cross-entropy on
tokens), starting from a stage-1 checkpoint (``init_from``: the embeddings and encoder
blocks are loaded; a mismatch is an error listing the mismatched shapes), and
``two-stage``: masked pretraining for ``pretrain_steps`` steps then autoregressive
fine-tuning for the rest, in one run (``pretrain_steps: 0`` is autoregressive training
from scratch at the same number of steps: the baseline).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import at_least_one
from .blocks import Block, init_weights, run_blocks
from .checkpoints import load_checkpoint
from .config_errors import ConfigError
from .flops import Flops, encoder, first_layer, linear
from .masking import MaskedBatch
from .masking.attention import Attention, frame_causal
from .masking.plan import EvalItem, MaskPlan, TrainItem
from .masking.video import next_frame_loss_mask
from .model_configs import MaskViTConfig, VideoConfig, VideoMAEConfig
from .patch_base import PatchModelBase
from .patchify import gather_rows, head, normalize_patches, sincos_3d, tubelets, untubelets
from .registry import MODELS

SHARED = ("model.embed_in", "model.blocks", "model.norm")  # what stage 2 loads from stage 1


# ------------------------------------------------------------------ networks
class VideoEncoder(nn.Module):
    """Tubelet embedding + positions -> blocks -> final norm, and the next-frame head of
    the autoregressive stage (``out`` features per token). Subclasses add the masked
    pretraining head and then call ``finish``."""

    def __init__(self, cfg: VideoConfig, embed: nn.Module, out: int):
        super().__init__()
        self.cfg = cfg
        self.n = cfg.grid[0] * cfg.grid[1] * cfg.grid[2]
        self.embed_in = embed
        self.register_buffer("pos", sincos_3d(cfg.width, cfg.grid), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        if cfg.stage != "pretrain":
            self.ar_head = nn.Linear(cfg.width, out)
        if cfg.actions:
            self.action_emb = nn.Embedding(cfg.actions, cfg.width)

    def finish(self) -> None:
        init_weights(self, self.cfg.depth)

    def add_actions(self, x: Tensor, actions: Tensor | None) -> Tensor:
        """x (B, N, D) tokens on the (F', h, w) grid + the embedding of the action taken at
        each frame, on every token of that frame (a tubelet of several frames: the sum of
        theirs). ``actions`` (B, F) or None: unconditioned (the model's "no actions")."""
        if actions is None or not self.cfg.actions:
            return x
        f, h, w = self.cfg.grid
        a = self.action_emb(actions[:, : f * self.cfg.tubelet_frames])  # (B, F, D)
        a = a.view(a.shape[0], f, self.cfg.tubelet_frames, -1).sum(2)  # (B, F', D)
        return x + a.repeat_interleave(h * w, dim=1).to(x.dtype)  # (B, N, D)


class VideoMAENet(VideoEncoder):
    """Conv3d tubelet embedding; decoder (own width and depth) for masked pretraining."""

    def __init__(self, cfg: VideoMAEConfig):
        k = (cfg.tubelet_frames, cfg.patch_size, cfg.patch_size)
        out = cfg.tubelet_frames * cfg.patch_size**2 * 3
        super().__init__(cfg, nn.Conv3d(3, cfg.width, kernel_size=k, stride=k), out)
        if cfg.stage != "autoregressive":
            self.decoder_embed = nn.Linear(cfg.width, cfg.decoder_width)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_width))
            self.register_buffer("dec_pos", sincos_3d(cfg.decoder_width, cfg.grid), persistent=False)
            self.decoder_blocks = nn.ModuleList(Block(cfg.decoder_width, cfg.decoder_heads)
                                                for _ in range(cfg.decoder_depth))
            self.decoder_norm = nn.LayerNorm(cfg.decoder_width)
            self.decoder_pred = nn.Linear(cfg.decoder_width, out)
        self.finish()
        if hasattr(self, "mask_token"):
            nn.init.normal_(self.mask_token, std=0.02)

    def tokens_in(self, clips: Tensor, masked: Tensor | None = None, actions: Tensor | None = None) -> Tensor:
        """(B, F, 3, H, W) -> (B, N, D) tubelet embeddings + positions (+ the frames' actions)."""
        x = self.embed_in(clips.transpose(1, 2)).flatten(2).transpose(1, 2) + self.pos[None]
        return self.add_actions(x, actions)

    def decode(self, latent: Tensor, keep_idx: Tensor) -> Tensor:
        """Latent (B, N_keep, D) -> pixel predictions of every tubelet (B, N, P)."""
        y = self.decoder_embed(latent)
        b, dd = y.shape[0], y.shape[-1]
        full = self.mask_token.to(y.dtype).expand(b, self.n, dd).clone()  # (B, N, Dd), autocast dtype
        full.scatter_(1, keep_idx[..., None].expand(-1, -1, dd), y)
        z = run_blocks(self.decoder_blocks, full + self.dec_pos[None], Attention())
        return self.decoder_pred(self.decoder_norm(z))


class MaskViTNet(VideoEncoder):
    """Token embedding with a [MASK] id (``vocab_size``); a vocabulary head on every token."""

    def __init__(self, cfg: MaskViTConfig):
        super().__init__(cfg, nn.Embedding(cfg.vocab_size + 1, cfg.width), cfg.vocab_size)
        if cfg.stage != "autoregressive":
            self.token_head = nn.Linear(cfg.width, cfg.vocab_size)
        self.finish()

    def tokens_in(self, ids: Tensor, masked: Tensor | None = None, actions: Tensor | None = None) -> Tensor:
        """(B, F, h, w) ids -> (B, N, D); ``masked`` (B, N) positions enter as [MASK]; the
        frames' actions added."""
        ids = ids.flatten(1)  # (B, N)
        if masked is not None:
            ids = torch.where(masked, torch.full_like(ids, self.cfg.vocab_size), ids)
        return self.add_actions(self.embed_in(ids) + self.pos[None], actions)


# ------------------------------------------------------------------ the autoregressive stage
class NextFrame:
    """Next-frame prediction on a family's targets: token (t, y, x) predicts the target
    of (t+1, y, x) under frame-causal attention; the last time step is not scored."""

    def __init__(self, grid: tuple[int, int, int]):
        self.grid = grid

    def batch(self, clips: Tensor, targets: Tensor, actions: Tensor | None = None) -> MaskedBatch:
        """The autoregressive view of ``clips`` given their per-token ``targets`` (B, N, ...)
        and the actions taken at each frame (B, F), if any: frame t's tokens carry the
        actions up to t, so its prediction of t + 1 sees no later action."""
        _, h, w = self.grid
        s = h * w
        shifted = torch.cat([targets[:, s:], targets[:, :s]], dim=1)  # position i -> target of i + s
        scored = next_frame_loss_mask(targets.shape[0], self.grid, targets.device)
        return MaskedBatch(inputs=clips, targets=shifted, loss_mask=scored,
                           attention=Attention(mask=frame_causal(self.grid, clips.device)), actions=actions)


# ------------------------------------------------------------------ the families
class VideoFamily(PatchModelBase):
    """The stage logic both video families share; a family gives its network (``Net``),
    per-token targets, losses and the masked-pretraining prediction."""

    Net: type[VideoEncoder]

    def __init__(self, config: dict):
        super().__init__(config)
        self.model = self.Net(self.run_config.model)
        self.next_frame = NextFrame(self.cfg.grid)
        self._loaded_init = False

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    @property
    def cfg(self) -> VideoConfig:
        return self.run_config.model

    # ------------------------------------------------------------ to implement
    def targets(self, clips: Tensor) -> Tensor:
        """Per-token targets (B, N, ...) of ``clips``."""
        raise NotImplementedError

    def loss_sums(self, out: Tensor, target: Tensor, scored: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def pretrain_out(self, masked: MaskedBatch, h: Tensor | None = None) -> Tensor:
        """Masked-pretraining predictions (B, N, ...) from the encoder output ``h``
        (default: run the encoder)."""
        raise NotImplementedError

    def pretrain_embed(self, masked: MaskedBatch) -> Tensor:
        """The encoder's input tokens under a mask."""
        raise NotImplementedError

    # ------------------------------------------------------------ masking plan and stage-1 weights
    @classmethod
    def masked_steps(cls, cfg) -> tuple[int, int]:
        """Two-stage runs train on masks for the first ``pretrain_steps`` steps only."""
        last = cfg.trainer.max_steps - 1
        if cfg.model.stage == "two-stage":
            last = min(last, cfg.model.pretrain_steps - 1)
        return 0, last

    @classmethod
    def mask_plan(cls, cfg, steps_per_epoch: int) -> MaskPlan:
        """Masked pretraining masks training clips (a new mask every step) and is scored
        on K fixed masks; the autoregressive stage masks nothing."""
        plan = super().mask_plan(cfg, steps_per_epoch)
        m = cfg.model
        if m.stage == "pretrain" or (m.stage == "two-stage" and m.pretrain_steps > 0):
            return plan
        return dataclasses.replace(plan, train=None, evaluation=())

    def load_pretrained(self, path: str) -> list[str]:
        """Load the embeddings and encoder blocks of a stage-1 checkpoint; returns the
        names loaded. Mismatched shapes are a ConfigError listing them."""
        state = load_checkpoint(path, "model.init_from").get("state_dict")
        if not isinstance(state, dict):
            raise ConfigError("model.init_from", path, "has no state_dict: not a Lightning checkpoint")
        own = self.state_dict()
        shared = [k for k in state if k.startswith(SHARED)]
        bad = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shared
               if k in own and state[k].shape != own[k].shape]
        missing = [k for k in own if k.startswith(SHARED) and k not in state]
        if bad or missing:
            detail = "; ".join(bad + [f"{k} missing" for k in missing])
            raise ConfigError("model.init_from", path, f"does not fit this model: {detail}")
        # An action-conditioned stage 1 hands its action embeddings on when stage 2 has the same.
        actions = [k for k in state if k.startswith("model.action_emb") and k in own and state[k].shape == own[k].shape]
        self.load_state_dict({k: state[k] for k in shared + actions}, strict=False)
        self._loaded_init = True
        return shared + actions

    def on_fit_start(self) -> None:
        if self.cfg.init_from and not self._loaded_init and self.global_step == 0:
            self.load_pretrained(self.cfg.init_from)

    # ------------------------------------------------------------ the step
    def phase(self) -> str:
        """What the model does now: "pretrain" or "autoregressive"."""
        if self.cfg.stage == "two-stage":
            return "pretrain" if self.global_step < self.cfg.pretrain_steps else "autoregressive"
        return self.cfg.stage

    def view_loss(self, masked: MaskedBatch) -> tuple[Tensor, Tensor]:
        return self.loss_sums(self.pretrain_out(masked), self.targets(masked.targets), masked.loss_mask)

    def ar_batch(self, clips: Tensor, actions: Tensor | None = None) -> MaskedBatch:
        return self.next_frame.batch(clips, self.targets(clips), actions)

    def ar_out(self, v: MaskedBatch, h: Tensor | None = None) -> Tensor:
        if h is None:
            h = run_blocks(self.blocks, self.model.tokens_in(v.inputs, actions=v.actions), v.attention)
        return self.model.ar_head(self.model.norm(h))

    def ar_loss(self, clips: Tensor, actions: Tensor | None = None, name: str = "next_frame_loss"):
        v = self.ar_batch(clips, actions)
        total, count = self.loss_sums(self.ar_out(v), v.targets, v.loss_mask)
        loss = total / at_least_one(count)  # the count stays on the device (no host sync)
        return loss, {name: (loss.detach(), count)}

    def conditioned(self, item) -> Tensor | None:
        """The batch's per-frame actions when the model is action-conditioned, else None."""
        return item.batch.actions if self.cfg.actions else None

    def action_metrics(self, clips: Tensor, actions: Tensor) -> dict[str, tuple[Tensor, int]]:
        """The next-frame loss with the actions shuffled across the clips of the batch
        (each clip gets the next clip's) and with no actions; and, for pixel models, the
        fraction of clips whose predicted frame moves the way a changed action says."""
        with torch.no_grad():
            out = {**self.ar_loss(clips, actions.roll(1, dims=0), "next_frame_loss_shuffled")[1],
                   **self.ar_loss(clips, None, "next_frame_loss_no_actions")[1]}
            frac = self.action_effect(clips, actions)
            if frac is not None:
                out["action_effect_frac"] = (torch.tensor(frac), clips.shape[0])
        return out

    def action_effect(self, clips: Tensor, actions: Tensor) -> float | None:
        """Families that predict pixels say how a changed action moves the prediction."""
        return None

    def _shared_step(self, item: TrainItem | EvalItem, stage: str):
        clips, actions = item.batch.clips, self.conditioned(item)
        if stage != "train":
            if self.cfg.stage == "pretrain":
                return self.masked_loss(item.common, stage)
            # The autoregressive stage is scored on next frames (the objective); a
            # two-stage run is also scored on its pretraining task.
            loss, metrics = self.ar_loss(clips, actions)
            if actions is not None:
                metrics.update(self.action_metrics(clips, actions))
            if item.common:
                metrics.update(self.masked_loss(item.common, stage)[1])
            return loss, metrics
        if item.masked is not None:
            return self.masked_loss([item.masked], stage)
        loss, metrics = self.ar_loss(clips, actions)
        if self.cfg.stage == "two-stage":
            # Nothing is masked after pretraining; without this the curve would repeat the
            # last pretraining ratio (Lightning keeps a step metric until the epoch ends).
            metrics["mask_ratio"] = (torch.zeros((), device=loss.device), 1)
        return loss, metrics

    @torch.no_grad()
    def predict_next(self, clips: Tensor, actions: Tensor | None = None) -> Tensor:
        """Autoregressive stage: predictions (B, N, ...); position i predicts the token
        one time step later at the same place (given the frames' actions, if any)."""
        return self.ar_out(self.ar_batch(clips, actions))

    # ------------------------------------------------------------ layer removal
    def ablation_batch(self, item: EvalItem) -> MaskedBatch:
        if self.phase() == "autoregressive":
            return self.ar_batch(item.batch.clips, self.conditioned(item))
        return super().ablation_batch(item)

    def ablation_embed(self, masked: MaskedBatch) -> Tensor:
        if self.phase() == "autoregressive":
            return self.model.tokens_in(masked.inputs, actions=masked.actions)
        return self.pretrain_embed(masked)

    def ablation_score(self, h: Tensor, masked: MaskedBatch) -> dict[str, tuple[Tensor, Tensor]]:
        if self.phase() == "autoregressive":
            s, n = self.loss_sums(self.ar_out(masked, h), masked.targets, masked.loss_mask)
            return {"next_frame_loss": (s, n)}
        s, n = self.loss_sums(self.pretrain_out(masked, h), self.targets(masked.targets), masked.loss_mask)
        return {"recon_loss": (s, n)}


    # ------------------------------------------------------------ compute
    def step_flops(self, item: TrainItem) -> tuple[Flops, int]:
        """Masked pretraining: the family's embedding and pretraining head; after it, the
        encoder and the next-frame head on every token."""
        b, n, c = item.batch.size, self.model.n, self.cfg
        if item.masked is not None:
            return self.embed_flops(b * n) + self.pretrain_flops(item.masked), b * n
        out = self.model.ar_head.out_features
        return self.embed_flops(b * n) + encoder(b, n, c.width, c.depth) + linear(b * n, c.width, out), b * n

    def embed_flops(self, tokens: int) -> Flops:
        """The input embedding of ``tokens`` tokens (default: a lookup, no FLOPs)."""
        return Flops()

    def pretrain_flops(self, masked: MaskedBatch) -> Flops:
        raise NotImplementedError

    # ------------------------------------------------------------ transfer features
    def transfer_embed(self, clips: Tensor) -> tuple[Tensor, Attention, None]:
        """Every tubelet of the clip, attended as in the current phase (joint over space
        and time in pretraining, frame-causal after it)."""
        attention = self.ar_batch(clips).attention if self.phase() == "autoregressive" else Attention()
        return self.model.tokens_in(clips), attention, None

    def transfer_pool(self, normed: Tensor, ctx) -> dict[str, Tensor]:
        return {"mean": normed.mean(1)}

    def transfer_norm(self, h: Tensor) -> Tensor:
        return self.model.norm(h)


@MODELS.register("video-mae")
class LitVideoMAE(VideoFamily):
    """VideoMAE on pixel clips (the encoder sees the visible tubelets), or its
    autoregressive fine-tuning."""

    Config = VideoMAEConfig
    Net = VideoMAENet

    def targets(self, clips: Tensor) -> Tensor:
        t = tubelets(clips, self.cfg.tubelet_frames, self.cfg.patch_size)
        return normalize_patches(t) if self.cfg.norm_pix_loss else t

    def loss_sums(self, out: Tensor, target: Tensor, scored: Tensor) -> tuple[Tensor, Tensor]:
        m = scored.float()
        return ((((out.float() - target.float()) ** 2).mean(-1)) * m).sum(), m.sum()

    def pretrain_embed(self, masked: MaskedBatch) -> Tensor:
        actions = masked.actions if self.cfg.actions else None
        return gather_rows(self.model.tokens_in(masked.inputs, actions=actions), masked.keep_idx)

    def embed_flops(self, tokens: int) -> Flops:
        c = self.cfg
        return first_layer(tokens, 3 * c.tubelet_frames * c.patch_size**2, c.width)

    def pretrain_flops(self, masked: MaskedBatch) -> Flops:
        """The encoder on the visible tubelets, the decoder on every tubelet."""
        c, (b, keep) = self.cfg, masked.keep_idx.shape
        out = self.model.decoder_pred.out_features
        return (encoder(b, keep, c.width, c.depth) + linear(b * keep, c.width, c.decoder_width)
                + encoder(b, self.model.n, c.decoder_width, c.decoder_depth)
                + linear(b * self.model.n, c.decoder_width, out))

    def pretrain_out(self, masked: MaskedBatch, h: Tensor | None = None) -> Tensor:
        if h is None:
            h = run_blocks(self.blocks, self.pretrain_embed(masked), Attention())
        return self.model.decode(self.model.norm(h), masked.keep_idx)

    @torch.no_grad()
    def action_effect(self, clips: Tensor, actions: Tensor) -> float | None:
        """The counterfactual: the action at the middle frame t set to right, then left
        (and down, then up), every other action kept; the fraction of (clip, axis) pairs
        whose predicted frame t + 1 has its centre of mass (pixel intensity) further
        right (down) under right (down). Only the controlled digit obeys the actions, so
        0.5 is chance and 1.0 every prediction moving the right way. Needs pixel
        predictions (``norm_pix_loss: false``) and one frame per time step."""
        c = self.cfg
        if c.norm_pix_loss or c.tubelet_frames != 1 or c.frames < 2:
            return None
        from .data.video import ACTION_NAMES

        t = c.frames // 2 - 1
        _, h, w = c.grid
        ys = torch.arange(c.image_size, device=clips.device, dtype=torch.float32)

        def centre(action: str) -> tuple[Tensor, Tensor]:
            a = actions.clone()
            a[:, t] = ACTION_NAMES.index(action)
            pred = self.ar_out(self.ar_batch(clips, a))[:, t * h * w:(t + 1) * h * w]  # (B, h*w, P): frame t + 1
            frame = untubelets(pred, 1, c.patch_size, (1, h, w))[:, 0]  # (B, 3, H, W), (x - 0.5) / 0.5
            ink = (frame.float() * 0.5 + 0.5).clamp(min=0).mean(1)  # (B, H, W)
            total = ink.sum((1, 2)).clamp(min=1e-6)
            return (ink.sum(2) * ys).sum(1) / total, (ink.sum(1) * ys).sum(1) / total  # (B,) y and x

        (_, right), (_, left) = centre("right"), centre("left")
        (down, _), (up, _) = centre("down"), centre("up")
        return float(torch.cat([right > left, down > up]).float().mean())

    @torch.no_grad()
    def frame_strip(self, item: EvalItem) -> Tensor:
        """(3, rows*H, F*W) in [0, 1] for the first validation clip. Pretraining:
        original | masked | reconstruction with the visible tubelets pasted back.
        Autoregressive: original | predicted next frames (frame f from frames < f)."""
        clip = item.batch.clips[:1]
        tf, p, grid = self.cfg.tubelet_frames, self.cfg.patch_size, self.cfg.grid
        raw = tubelets(clip, tf, p)  # (1, N, P) unnormalized pixels
        mean, std = raw.mean(-1, keepdim=True), (raw.var(-1, keepdim=True) + 1e-6).sqrt()
        denorm = (lambda y: y * std + mean) if self.cfg.norm_pix_loss else (lambda y: y)
        if self.phase() == "autoregressive" or not item.common:
            actions = None if self.conditioned(item) is None else item.batch.actions[:1]
            pred = denorm(torch.roll(self.ar_out(self.ar_batch(clip, actions)), shifts=grid[1] * grid[2], dims=1))
            t0 = grid[1] * grid[2]
            pred[:, :t0] = raw[:, :t0]  # the first step has no prediction: show it as given
            rows = [raw, pred]
        else:
            v = head(item.common[0], 1)
            pred = denorm(self.pretrain_out(v))
            m = v.loss_mask[..., None].float()
            rows = [raw, raw * (1 - m), raw * (1 - m) + pred * m]
        frames = [untubelets(r, tf, p, grid)[0] for r in rows]  # each (F, 3, H, W)
        img = torch.cat([torch.cat(list(f), dim=2) for f in frames], dim=1)  # (3, rows*H, F*W)
        return (img * 0.5 + 0.5).clamp(0, 1)  # the data's (x - 0.5) / 0.5 undone

    def validation_image(self, item: EvalItem) -> Tensor:
        return self.frame_strip(item)


@MODELS.register("maskvit")
class LitMaskViT(VideoFamily):
    """MaskViT on token clips ([MASK] embeddings at the masked positions), or its
    autoregressive fine-tuning."""

    Config = MaskViTConfig
    Net = MaskViTNet

    def targets(self, clips: Tensor) -> Tensor:
        return clips.flatten(1)  # (B, N) ids

    def loss_sums(self, out: Tensor, target: Tensor, scored: Tensor) -> tuple[Tensor, Tensor]:
        m = scored.float()
        ce = F.cross_entropy(out.flatten(0, 1).float(), target.flatten(), reduction="none").view_as(m)
        return (ce * m).sum(), m.sum()

    def pretrain_embed(self, masked: MaskedBatch) -> Tensor:
        return self.model.tokens_in(masked.inputs, masked.loss_mask, masked.actions if self.cfg.actions else None)

    def pretrain_flops(self, masked: MaskedBatch) -> Flops:
        """Every position through the encoder ([MASK] embeddings where masked), the
        vocabulary head on every position."""
        c, b, n = self.cfg, masked.inputs.shape[0], self.model.n
        return encoder(b, n, c.width, c.depth) + linear(b * n, c.width, c.vocab_size)

    def pretrain_out(self, masked: MaskedBatch, h: Tensor | None = None) -> Tensor:
        if h is None:
            h = run_blocks(self.blocks, self.pretrain_embed(masked), Attention())
        return self.model.token_head(self.model.norm(h))
