"""The model families' configs: frozen dataclasses, torch-free.

Each family's implementation (``gpt.py``, ``bert.py``, ``mae.py``, ``video.py``) takes its
config from here. Keeping the configs apart from torch lets ``masklab`` validate a spec
or a ``--set`` value in well under a second, before torch or Lightning is imported; the
registry (``registry.py``) finds a config by the family's name without importing the
family. Each config also says what the family trains on: the masking strategies it
accepts (``maskings``) and the data kinds (``data_kinds``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .config_errors import ConfigError, check_at_least, check_dropout, check_width
from .registry import MODELS

# Video: what a clip holds, and what a run trains.
CLIP_KINDS = ("pixels", "tokens")
STAGES = ("pretrain", "autoregressive", "two-stage")


@MODELS.register_config("gpt")
@dataclass(frozen=True)
class GPTConfig:
    # What the family trains on: the masking strategies it accepts and the data kinds.
    maskings: ClassVar[tuple[str, ...]] = ("causal-lm",)
    data_kinds: ClassVar[tuple[str, ...]] = ("text",)
    name: str = "gpt"
    depth: int = 2
    width: int = 64
    heads: int = 2
    block_size: int = 64
    dropout: float = 0.0
    tie_embeddings: bool = True

    def __post_init__(self):
        check_at_least(self, ("depth", "heads"))
        check_width(self)
        check_at_least(self, ("block_size",), 2)
        check_dropout(self.dropout)


@MODELS.register_config("bert")
@dataclass(frozen=True)
class BERTConfig:
    maskings: ClassVar[tuple[str, ...]] = ("mlm-random", "mlm-whole-word", "mlm-span")
    data_kinds: ClassVar[tuple[str, ...]] = ("text",)
    name: str = "bert"
    depth: int = 2
    width: int = 64
    heads: int = 2
    block_size: int = 64  # longest sequence, [CLS] and [SEP] included
    dropout: float = 0.0
    # Validation, the common evaluation task of every trial whatever it trained on: K
    # fixed masks per sequence drawn by the `eval_masking` strategy (its defaults:
    # 80/10/10 replacement) at `eval_mask_ratio`; logged as val/mlm_loss, val/mlm_acc.
    eval_masks: int = 4
    eval_mask_ratio: float = 0.15
    eval_masking: str = "mlm-random"

    def __post_init__(self):
        check_at_least(self, ("depth", "heads"))
        check_width(self)
        check_at_least(self, ("block_size",), 4)
        check_dropout(self.dropout)
        if self.eval_masks < 1:
            raise ConfigError("eval_masks", self.eval_masks, "must be an integer >= 1")
        if not 0.0 < self.eval_mask_ratio < 1.0:
            raise ConfigError("eval_mask_ratio", self.eval_mask_ratio, "must be in (0, 1)")
        if self.eval_masking not in self.maskings:
            raise ConfigError("eval_masking", self.eval_masking, f"allowed: {', '.join(self.maskings)}")


@MODELS.register_config("mae")
@dataclass(frozen=True)
class MAEConfig:
    maskings: ClassVar[tuple[str, ...]] = ("mae-random", "mae-block")
    data_kinds: ClassVar[tuple[str, ...]] = ("image",)
    name: str = "mae"
    image_size: int = 32
    patch_size: int = 16
    depth: int = 2  # encoder blocks
    width: int = 64
    heads: int = 2
    decoder_depth: int = 1
    decoder_width: int = 32
    decoder_heads: int = 2
    norm_pix_loss: bool = True
    eval_masks: int = 2  # fixed validation masks per image

    def __post_init__(self):
        check_at_least(self, ("depth", "heads", "decoder_depth", "decoder_heads", "patch_size", "eval_masks"))
        if self.image_size < 1 or self.image_size % self.patch_size:
            raise ConfigError("image_size", self.image_size,
                              f"must be a positive multiple of patch_size ({self.patch_size})")
        check_width(self)
        check_width(self, "decoder_width", "decoder_heads")

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size
        return g, g


@MODELS.register_config("video")
@dataclass(frozen=True)
class VideoConfig:
    maskings: ClassVar[tuple[str, ...]] = ("video-tube", "video-random", "video-frame")
    data_kinds: ClassVar[tuple[str, ...]] = ("video",)
    name: str = "video"
    clip_kind: str = "pixels"
    stage: str = "pretrain"
    init_from: str = ""  # stage-1 checkpoint for the autoregressive stage ("" = from scratch)
    # "two-stage": masked pretraining for the first pretrain_steps steps, then
    # autoregressive fine-tuning for the rest, in one run (0 = autoregressive from scratch).
    pretrain_steps: int = 0
    frames: int = 4
    image_size: int = 32  # pixels: H = W; tokens: the token grid side h = w
    tubelet_frames: int = 2
    patch_size: int = 16  # tokens: 1
    vocab_size: int = 0  # tokens only
    depth: int = 2
    width: int = 64
    heads: int = 2
    decoder_depth: int = 1
    decoder_width: int = 32
    decoder_heads: int = 2
    norm_pix_loss: bool = False
    eval_masks: int = 2

    def __post_init__(self):
        if self.clip_kind not in CLIP_KINDS:
            raise ConfigError("clip_kind", self.clip_kind, f"allowed: {', '.join(CLIP_KINDS)}")
        if self.stage not in STAGES:
            raise ConfigError("stage", self.stage, f"allowed: {', '.join(STAGES)}")
        check_at_least(self, ("frames", "tubelet_frames", "patch_size", "depth", "heads", "decoder_depth",
                              "decoder_heads", "eval_masks"))
        if self.frames % self.tubelet_frames:
            raise ConfigError("frames", self.frames, f"must be a multiple of tubelet_frames ({self.tubelet_frames})")
        if self.image_size % self.patch_size:
            raise ConfigError("image_size", self.image_size, f"must be a multiple of patch_size ({self.patch_size})")
        if self.clip_kind == "tokens" and (self.patch_size != 1 or self.tubelet_frames != 1 or self.vocab_size < 2):
            raise ConfigError("vocab_size" if self.vocab_size < 2 else "patch_size",
                              self.vocab_size if self.vocab_size < 2 else self.patch_size,
                              "token clips need vocab_size >= 2, patch_size 1 and tubelet_frames 1")
        if self.pretrain_steps < 0:
            raise ConfigError("pretrain_steps", self.pretrain_steps, "must be >= 0")
        if self.stage != "pretrain" and self.frames // self.tubelet_frames < 2:
            raise ConfigError("frames", self.frames, "the autoregressive stage needs at least 2 time steps")
        for w, h in (("width", "heads"), ("decoder_width", "decoder_heads")):
            if getattr(self, w) < 4 or getattr(self, w) % getattr(self, h) or getattr(self, w) % 4:
                raise ConfigError(w, getattr(self, w), f"must be a multiple of 4 and of {h} ({getattr(self, h)})")

    @property
    def grid(self) -> tuple[int, int, int]:
        g = self.image_size // self.patch_size
        return self.frames // self.tubelet_frames, g, g
