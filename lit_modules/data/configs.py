"""The datasets' configs: frozen dataclasses, torch-free (see ``model_configs.py``).

One config per kind of data; each dataset of that kind is registered by name here and
implemented in ``text.py``, ``images.py`` or ``video.py`` (a ``LightningDataModule``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ..config_errors import ConfigError
from ..registry import DATASETS

CLIP_KINDS = ("pixels", "tokens")


@DATASETS.register_config("wikitext-2", "tinyshakespeare", "text")
@dataclass(frozen=True)
class TextDataConfig:
    kind: ClassVar[str] = "text"
    name: str = "wikitext-2"
    # For "text": a file or a folder of *.txt files, relative to the data dir or absolute.
    path: str = ""
    # For corpora without a separate validation file: the fraction held out (the tail).
    val_fraction: float = 0.1
    tokenizer: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = 512
    batch_size: int = 16
    val_batch_size: int = 32
    # At most this many validation windows (0 = every non-overlapping window).
    val_windows: int = 64
    # DataLoader worker processes per training process ("auto": a share of the CPU
    # cores on a CUDA device, 0 on a CPU; lit_modules/data/loading.py) and the batches
    # each keeps ready. How the data is loaded, not what: never part of the config hash.
    num_workers: int | Literal["auto"] = "auto"
    prefetch_factor: int = 2

    def __post_init__(self):
        if self.num_workers != "auto" and self.num_workers < 0:
            raise ConfigError("num_workers", self.num_workers, "must be an integer >= 0 or auto")
        if self.prefetch_factor < 1:
            raise ConfigError("prefetch_factor", self.prefetch_factor, "must be an integer >= 1")
        # SentencePiece needs room for its specials plus the alphabet.
        if not 64 <= self.vocab_size <= 65536:
            raise ConfigError("vocab_size", self.vocab_size, "must be in [64, 65536]")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError("val_fraction", self.val_fraction, "must be in (0, 1)")
        for name in ("batch_size", "val_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, getattr(self, name), "must be an integer >= 1")
        if self.val_windows < 0:
            raise ConfigError("val_windows", self.val_windows, "must be >= 0 (0 = all)")


@DATASETS.register_config("tiny-imagenet", "cifar10", "image-folder")
@dataclass(frozen=True)
class ImageDataConfig:
    kind: ClassVar[str] = "image"
    name: str = "tiny-imagenet"
    # For "image-folder": a folder of PNG/JPEG files (one subfolder per class, or none).
    path: str = ""
    # 0 = the dataset's native size; otherwise shorter side resized to it, center-cropped.
    image_size: int = 0
    batch_size: int = 32
    val_batch_size: int = 64
    # Fraction of images held out for validation (chosen by a hash of each image).
    val_fraction: float = 0.1
    # At most this many validation images, evenly spread over the split (0 = all).
    val_images: int = 0
    # MAE's training augmentation: RandomResizedCrop(scale=(crop_scale_min, 1)) + flip.
    augment: bool = True
    crop_scale_min: float = 0.2
    # Subtract the ImageNet mean and divide by its std, per channel.
    normalize: bool = True
    # DataLoader worker processes per training process ("auto": a share of the CPU
    # cores on a CUDA device, 0 on a CPU; lit_modules/data/loading.py) and the batches
    # each keeps ready. How the data is loaded, not what: never part of the config hash.
    num_workers: int | Literal["auto"] = "auto"
    prefetch_factor: int = 2
    # Image sets whose decoded pixels (N x S x S x 3 bytes) exceed this many GB are not
    # cached: each image is decoded when its batch is assembled, in the workers.
    cache_limit_gb: float = 16.0

    def __post_init__(self):
        if self.num_workers != "auto" and self.num_workers < 0:
            raise ConfigError("num_workers", self.num_workers, "must be an integer >= 0 or auto")
        if self.prefetch_factor < 1:
            raise ConfigError("prefetch_factor", self.prefetch_factor, "must be an integer >= 1")
        if self.cache_limit_gb < 0:
            raise ConfigError("cache_limit_gb", self.cache_limit_gb, "must be >= 0 (0: never cache the pixels)")
        if self.image_size < 0:
            raise ConfigError("image_size", self.image_size, "must be >= 0 (0 = the dataset's native size)")
        for name in ("batch_size", "val_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, getattr(self, name), "must be an integer >= 1")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError("val_fraction", self.val_fraction, "must be in (0, 1)")
        if self.val_images < 0:
            raise ConfigError("val_images", self.val_images, "must be >= 0 (0 = all)")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ConfigError("crop_scale_min", self.crop_scale_min, "must be in (0, 1]")


@DATASETS.register_config("bbb", "moving-mnist", "video-tokens", "video-file")
@dataclass(frozen=True)
class VideoDataConfig:
    kind: ClassVar[str] = "video"
    name: str = "bbb"
    # For "video-tokens": a .npy of integer ids shaped (n_clips, frames, h, w).
    path: str = ""
    # Clip length: the first `frames` frames of each clip (bbb has 16).
    frames: int = 16
    # Pixel clips: 64 or a divisor of 64 (average-pooled from 64x64).
    image_size: int = 64
    batch_size: int = 8
    val_batch_size: int = 16
    # At most this many validation clips, evenly spread over the split (0 = all).
    val_clips: int = 0
    # "pixels" (bbb, moving-mnist) or "tokens" (video-tokens); must match the dataset.
    clip_kind: Literal["pixels", "tokens"] = "pixels"
    # Tokens only: ids lie in [0, vocab_size).
    vocab_size: int = 0
    # Pixel clips: mirror each training clip horizontally with probability 1/2.
    flip: bool = True
    # moving-mnist only: number of clips and digits per clip.
    n_clips: int = 2000
    digits: int = 2
    # moving-mnist only: 5 = the first digit of each clip is controlled, moved each frame
    # by an action (0 stay, 1 up, 2 down, 3 left, 4 right) stored with the clips; 0 = none.
    actions: Literal[0, 5] = 0
    # video-tokens only: tokenize a pixel dataset ("bbb" or "moving-mnist", at frames,
    # image_size, n_clips, digits above) with the patch tokenizer instead of reading
    # `path`: vocab_size k-means words of token_patch x token_patch patches, fit on the
    # training clips' frames (lit_modules/patch_tokenizer.py), both cached.
    source: Literal["", "bbb", "moving-mnist"] = ""
    token_patch: int = 8
    # DataLoader worker processes per training process ("auto": a share of the CPU
    # cores on a CUDA device, 0 on a CPU; lit_modules/data/loading.py) and the batches
    # each keeps ready. How the data is loaded, not what: never part of the config hash.
    num_workers: int | Literal["auto"] = "auto"
    prefetch_factor: int = 2

    def __post_init__(self):
        if self.num_workers != "auto" and self.num_workers < 0:
            raise ConfigError("num_workers", self.num_workers, "must be an integer >= 0 or auto")
        if self.prefetch_factor < 1:
            raise ConfigError("prefetch_factor", self.prefetch_factor, "must be an integer >= 1")
        for name in ("frames", "image_size", "batch_size", "val_batch_size", "n_clips", "digits"):
            if getattr(self, name) < 1:
                raise ConfigError(name, getattr(self, name), "must be an integer >= 1")
        if self.val_clips < 0:
            raise ConfigError("val_clips", self.val_clips, "must be >= 0 (0 = all)")
        if self.vocab_size < 0:
            raise ConfigError("vocab_size", self.vocab_size, "must be >= 0")
        if self.clip_kind == "tokens" and self.vocab_size < 1:
            raise ConfigError("vocab_size", self.vocab_size, "required (>= 1) when clip_kind is 'tokens'")
        if self.actions and (self.source or self.name) != "moving-mnist":
            raise ConfigError("actions", self.actions, f"only moving-mnist clips have actions (dataset {self.name!r}"
                                                       f"{f', source {self.source!r}' if self.source else ''})")
        if self.source and self.path:
            raise ConfigError("source", self.source, f"tokenizes a pixel dataset; data.path ({self.path!r}) reads "
                                                     "ready-made ids: set one of them")
        if self.source and self.vocab_size < 2:
            raise ConfigError("vocab_size", self.vocab_size, "is the tokenizer's codebook size with data.source: >= 2")
        if self.token_patch < 1 or self.image_size % self.token_patch:
            raise ConfigError("token_patch", self.token_patch,
                              f"must be a positive divisor of image_size ({self.image_size})")


DataConfig = TextDataConfig | ImageDataConfig | VideoDataConfig
