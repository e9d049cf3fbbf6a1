"""The model families' configs: frozen dataclasses, torch-free.

Each family's implementation (``gpt.py``, ``bert.py``, ``electra.py``, ``mae.py``,
``video.py``) takes its config from here. Keeping the configs apart from torch lets ``masklab`` validate a spec
or a ``--set`` value in well under a second, before torch or Lightning is imported; the
registry (``registry.py``) finds a config by the family's name without importing the
family. Each config also says what the family trains on: the masking strategies it
consumes (``consumes``, a batch kind of ``masking/batches.py``: a masking fits the family
when it accepts that kind) and the data kinds (``data_kinds``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from .config_errors import ConfigError, check_at_least, check_dropout, check_width
from .masking.batches import Clips, Images, TokenRows, TokenWindows
from .registry import MASKINGS, MODELS


def maskings_for(kind: type) -> list[str]:
    """The registered maskings that accept batches of ``kind`` (derived, never listed)."""
    return [n for n in MASKINGS.names() if MASKINGS.config(n).accepts is kind]




@MODELS.register_config("gpt")
@dataclass(frozen=True)
class GPTConfig:
    # What the family trains on: the batch kind its maskings must accept, the data kinds.
    consumes: ClassVar[type] = TokenWindows
    data_kinds: ClassVar[tuple[str, ...]] = ("text",)
    # Transfer (lit_modules/transfer): the task inputs it reads and its feature kinds,
    # the first the primary one. fw/bw: mean over tokens of the forward / backward pass.
    transfer_input: ClassVar[str] = "text"
    transfer_features: ClassVar[tuple[str, ...]] = ("fw", "bw", "fw_bw")
    # The attention section's kinds it supports (config.AttentionConfig); others: full only.
    attention_kinds: ClassVar[tuple[str, ...]] = ("full", "sliding", "longformer", "bigbird", "prefix")
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
    consumes: ClassVar[type] = TokenRows
    data_kinds: ClassVar[tuple[str, ...]] = ("text",)
    transfer_input: ClassVar[str] = "text"
    transfer_features: ClassVar[tuple[str, ...]] = ("mean", "cls")  # mean over tokens; the [CLS] token
    attention_kinds: ClassVar[tuple[str, ...]] = ("full", "sliding", "longformer", "bigbird")
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
        fits = maskings_for(self.consumes)
        if self.eval_masking not in fits:
            raise ConfigError("eval_masking", self.eval_masking, f"allowed: {', '.join(fits)}")


@MODELS.register_config("electra")
@dataclass(frozen=True)
class ElectraConfig(BERTConfig):
    """ELECTRA (Clark et al. 2020): a small masked-LM generator fills the masked positions
    with samples and the discriminator (``depth``, ``width``, ``heads``: the encoder kept
    for transfer and layer removal) tells replaced tokens from original ones.

    generator_size:   generator width = round(width * generator_size), in (0, 1]; its
                      heads: about heads * generator_size, the largest count <= that which
                      divides the generator width (at least 1).
    generator_depth:  generator blocks; 0 = as many as the discriminator (the paper's).
    rtd_weight:       the loss is mlm + rtd_weight * rtd (the paper's lambda = 50).
    share_embeddings: the generator reads the discriminator's token and position
                      embeddings (through a linear projection when narrower) and its MLM
                      output is tied to them; false: its own, at its own width.
    """

    name: str = "electra"
    generator_size: float = 0.25
    generator_depth: int = 0
    rtd_weight: float = 50.0
    share_embeddings: bool = True

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.generator_size <= 1.0:
            raise ConfigError("generator_size", self.generator_size, "must be in (0, 1]")
        if self.generator_width < 1:
            raise ConfigError("generator_size", self.generator_size,
                              f"gives a generator of width round({self.width} * {self.generator_size:g}) = 0; "
                              f"must give >= 1")
        if self.generator_depth < 0:
            raise ConfigError("generator_depth", self.generator_depth, "must be an integer >= 0 (0 = depth)")
        if not 0.0 <= self.rtd_weight < float("inf"):
            raise ConfigError("rtd_weight", self.rtd_weight, "must be a finite number >= 0")

    @property
    def generator_width(self) -> int:
        return round(self.width * self.generator_size)

    @property
    def generator_heads(self) -> int:
        """About ``heads * generator_size``: the largest count up to that which divides the
        generator width, so every head has a whole head dimension."""
        target = max(1, round(self.heads * self.generator_size))
        return max(h for h in range(1, target + 1) if self.generator_width % h == 0)

    @property
    def generator_layers(self) -> int:
        return self.generator_depth or self.depth


@MODELS.register_config("beit")
@dataclass(frozen=True)
class BEiTConfig:
    """BEiT (Bao et al. 2021): a ViT encoder reads every patch, the masked ones replaced by
    a learned [MASK] embedding, and predicts the masked patches' discrete visual tokens
    (``patch_tokenizer.py``: ``codebook_size`` k-means words of ``patch_size`` patches,
    fit on the run's training images) by cross-entropy."""

    consumes: ClassVar[type] = Images
    data_kinds: ClassVar[tuple[str, ...]] = ("image",)
    transfer_input: ClassVar[str] = "image"
    transfer_features: ClassVar[tuple[str, ...]] = ("mean", "cls")
    name: str = "beit"
    image_size: int = 32
    patch_size: int = 8
    depth: int = 2
    width: int = 64
    heads: int = 2
    codebook_size: int = 256  # visual words of the patch tokenizer
    tokenizer_patches: int = 40000  # training patches its k-means sees
    eval_masks: int = 2  # fixed validation masks per image

    def __post_init__(self):
        check_at_least(self, ("depth", "heads", "patch_size", "eval_masks"))
        check_at_least(self, ("codebook_size",), 2)
        if self.image_size < 1 or self.image_size % self.patch_size:
            raise ConfigError("image_size", self.image_size,
                              f"must be a positive multiple of patch_size ({self.patch_size})")
        if self.tokenizer_patches < self.codebook_size:
            raise ConfigError("tokenizer_patches", self.tokenizer_patches,
                              f"must be >= codebook_size ({self.codebook_size}): k-means needs a patch per word")
        check_width(self)

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size
        return g, g


@MODELS.register_config("mae")
@dataclass(frozen=True)
class MAEConfig:
    consumes: ClassVar[type] = Images
    data_kinds: ClassVar[tuple[str, ...]] = ("image",)
    transfer_input: ClassVar[str] = "image"
    transfer_features: ClassVar[tuple[str, ...]] = ("mean", "cls")  # mean of the patch tokens; the class token
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


@dataclass(frozen=True)
class VideoConfig:
    """The fields of both video families (not registered itself).

    stage: ``pretrain`` (masked pretraining), ``autoregressive`` (next-frame prediction
    with frame-causal attention, from ``init_from`` or from scratch) or ``two-stage``
    (masked pretraining for ``pretrain_steps`` steps, then autoregressive fine-tuning
    for the rest, in one run; ``pretrain_steps: 0`` is autoregressive from scratch at
    the same number of steps: the baseline).
    """

    consumes: ClassVar[type] = Clips
    data_kinds: ClassVar[tuple[str, ...]] = ("video",)
    clip_kind: ClassVar[str] = "pixels"
    transfer_input: ClassVar[str] = "clip"
    transfer_features: ClassVar[tuple[str, ...]] = ("mean",)  # mean of the tubelet tokens
    name: str = ""
    stage: Literal["pretrain", "autoregressive", "two-stage"] = "pretrain"
    init_from: str = ""  # stage-1 checkpoint for the autoregressive stage ("" = from scratch)
    pretrain_steps: int = 0
    frames: int = 4
    image_size: int = 32  # pixels: H = W; tokens: the token grid side h = w
    tubelet_frames: int = 2
    patch_size: int = 16
    depth: int = 2
    width: int = 64
    heads: int = 2
    eval_masks: int = 2
    # > 0: action-conditioned (data with per-frame actions, e.g. moving-mnist actions: 5):
    # one learned embedding per action, added to every token of the frame it was taken at.
    actions: int = 0

    def __post_init__(self):
        check_at_least(self, ("frames", "tubelet_frames", "patch_size", "depth", "heads", "eval_masks"))
        if self.actions < 0:
            raise ConfigError("actions", self.actions, "must be >= 0 (0: not action-conditioned)")
        if self.frames % self.tubelet_frames:
            raise ConfigError("frames", self.frames, f"must be a multiple of tubelet_frames ({self.tubelet_frames})")
        if self.image_size % self.patch_size:
            raise ConfigError("image_size", self.image_size, f"must be a multiple of patch_size ({self.patch_size})")
        if self.pretrain_steps < 0:
            raise ConfigError("pretrain_steps", self.pretrain_steps, "must be >= 0")
        if self.stage != "pretrain" and self.frames // self.tubelet_frames < 2:
            raise ConfigError("frames", self.frames, "the autoregressive stage needs at least 2 time steps")
        _check_width4(self, "width", "heads")

    @property
    def grid(self) -> tuple[int, int, int]:
        g = self.image_size // self.patch_size
        return self.frames // self.tubelet_frames, g, g


def _check_width4(cfg, w: str, h: str) -> None:
    """A width for sin-cos positions (a multiple of 4) that splits into its heads."""
    if getattr(cfg, w) < 4 or getattr(cfg, w) % getattr(cfg, h) or getattr(cfg, w) % 4:
        raise ConfigError(w, getattr(cfg, w), f"must be a multiple of 4 and of {h} ({getattr(cfg, h)})")


@MODELS.register_config("video-mae")
@dataclass(frozen=True)
class VideoMAEConfig(VideoConfig):
    """VideoMAE on pixel clips: tubelets of ``tubelet_frames`` x ``patch_size`` x
    ``patch_size``; a light decoder reconstructs the masked ones."""

    name: str = "video-mae"
    decoder_depth: int = 1
    decoder_width: int = 32
    decoder_heads: int = 2
    norm_pix_loss: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_at_least(self, ("decoder_depth", "decoder_heads"))
        _check_width4(self, "decoder_width", "decoder_heads")


@MODELS.register_config("maskvit")
@dataclass(frozen=True)
class MaskViTConfig(VideoConfig):
    """MaskViT on token clips (B, F, h, w) of a discrete tokenizer with ``vocab_size``
    ids: masked positions enter as a learned [MASK] embedding."""

    clip_kind: ClassVar[str] = "tokens"
    transfer_input: ClassVar[str] = ""  # token clips: no labelled task reads them
    transfer_features: ClassVar[tuple[str, ...]] = ()
    name: str = "maskvit"
    tubelet_frames: int = 1
    patch_size: int = 1
    vocab_size: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.vocab_size < 2:
            raise ConfigError("vocab_size", self.vocab_size, "must be >= 2 (the ids of the token clips)")
        if self.patch_size != 1 or self.tubelet_frames != 1:
            raise ConfigError("patch_size" if self.patch_size != 1 else "tubelet_frames",
                              self.patch_size if self.patch_size != 1 else self.tubelet_frames,
                              "must be 1: a token clip is already one token per position")


# Families renamed: the old name is a one-line error naming the new ones.
MODELS.retire("video", "split into video-mae (VideoMAE, pixel clips) and maskvit (MaskViT, token clips); "
                       "set model.name to one of them (a spec: model: video-mae)")


ModelConfig = GPTConfig | BERTConfig | ElectraConfig | MAEConfig | VideoMAEConfig | MaskViTConfig
