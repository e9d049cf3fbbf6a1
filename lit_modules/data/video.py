"""Video datasets -> uint8 clips (or token-id clips) -> step batches of whole clips.

Three datasets, all of ``kind = "video"``:

- ``bbb``: Big Buck Bunny, ``big-buck-bunny/bbb_clips_16x64x64.npz`` (real RGB video).
  Train = its ``train`` array (45 clips), validation = ``heldout`` (8 clips from another
  part of the film). Clips are concatenated as ``train + heldout``, so ``index`` 45..52
  are the held-out clips.
- ``moving-mnist``: ``digits`` MNIST test digits (28x28) bouncing in a 64x64 frame
  (Srivastava et al. 2015), generated once from a generator seeded by the constant
  ``MOVING_MNIST_SEED`` (never the run seed: every trial sees the same clips) and cached
  as .npy in the workspace cache dir, keyed by its parameters. Last 10% of clips = val.
  With ``actions: 5`` digit 0 is controlled: it moves by the action taken at each frame
  (stay, up, down, left, right), stored with the clips (``Clips.actions``, (B, F)).
- ``video-tokens``: a .npy of pre-tokenized clips, integer ids ``(n_clips, frames, h, w)``
  (frames already encoded by a discrete tokenizer), memory-mapped. ``vocab_size`` must
  exceed every id. Last 10% of clips = val. Or, with ``source: bbb | moving-mnist``, that
  pixel dataset tokenized by masklab's patch tokenizer (``vocab_size`` k-means words of
  ``token_patch`` patches fit on its training clips' frames; both cached), with its split.

Every batch is a ``masking.batches.Clips``; pixel clips (``clip_kind: pixels``)::

    clips   (B, F, 3, H, W) float32   in [0, 1], then (x - 0.5) / 0.5, i.e. in [-1, 1]
    keys    (B,)            int64     content key: blake2b-64 of the stored uint8 clip
    index   (B,)            int64     position of the clip in the dataset

Grayscale clips (moving-mnist) are replicated to 3 channels, so a pixel model always
sees 3 channels. Token clips (``clip_kind: tokens``) hold ids instead::

    clips   (B, F, h, w)    int64     ids in [0, vocab_size)
    keys, index                       as above (keys hash the ids as little-endian int64)

``image_size`` (pixel clips) must be 64 or a divisor of it: frames are average-pooled
down from 64x64. Only the first ``frames`` frames of each clip are used.

Training batches are drawn (with replacement) from the train split by a counter-based
hash of ``(seed, step)`` (stream ``Stream.VIDEO_BATCH``), and, when ``flip`` is on, each
pixel clip is mirrored horizontally (all its frames alike) by a hash of ``(seed, step,
row)`` (stream ``Stream.VIDEO_FLIP``): batch ``step`` is identical in every run with that seed. Keys
are those of the un-flipped clip. Validation batches are fixed clips in index order.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ..config_errors import ConfigError
from ..masking.batches import Clips
from ..masking.plan import MaskPlan
from ..masking.rng import Stream, step_bits, to_uniform
from ..paths import Workspace, atomic_path
from ..registry import DATASETS
from .configs import VideoDataConfig
from .images import _hash64, spread
from .loading import LoaderMixin
from .masked import EvalCollate, Planned
from .steps import FixedBatches, StepBatches, StepSampler, step_draw

# Pixel clips: x in [0, 1] -> (x - MEAN) / STD, the same for every channel.
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5
NATIVE_SIZE = 64  # frame size of bbb and moving-mnist
VAL_FRACTION = 0.1  # moving-mnist and video-tokens: the last 10% of clips are validation
# Moving-MNIST: the generator's fixed seed and the motion of Srivastava et al.'s script
# (positions in [0, 1] of the free range 64 - 28 = 36 px, step 0.1 per frame = 3.6 px).
MOVING_MNIST_SEED = 20150101
MNIST_FILE = "mnist/t10k-images-idx3-ubyte.gz"
BBB_FILE = "big-buck-bunny/bbb_clips_16x64x64.npz"
DIGIT_SIZE = 28
STEP_LENGTH = 0.1
# Bump when the cache layout or the generation changes, so old caches are not reused.
CACHE_VERSION = 1


# ---------------------------------------------------------------- helpers


def clip_keys(clips: np.ndarray) -> np.ndarray:
    """(N, ...) clips -> (N,) int64 content keys: blake2b-64 of each clip's bytes.

    uint8 clips are hashed as they are, integer ids as little-endian int64 (so the key
    does not depend on the file's dtype); same role as ``images.image_keys``."""
    dtype = np.uint8 if clips.dtype == np.uint8 else np.dtype("<i8")
    return _hash64([np.ascontiguousarray(c, dtype=dtype).tobytes() for c in clips], b"masklab-clip")


def pool_frames(clips: np.ndarray, image_size: int) -> np.ndarray:
    """(N, F, 64, 64[, C]) uint8 -> (N, F, S, S[, C]) uint8 by k x k average pooling
    (k = 64 / S), rounded to nearest. Identity when S = 64."""
    k = NATIVE_SIZE // image_size
    if k == 1:
        return clips
    n, f, h, w = clips.shape[:4]
    rest = clips.shape[4:]
    x = clips.reshape(n, f, h // k, k, w // k, k, *rest).astype(np.float32).mean(axis=(3, 5))
    return np.rint(x).astype(np.uint8)


def check_image_size(image_size: int) -> None:
    if NATIVE_SIZE % image_size:
        allowed = [d for d in range(1, NATIVE_SIZE + 1) if NATIVE_SIZE % d == 0]
        raise ConfigError("data.image_size", image_size,
                          f"must be {NATIVE_SIZE} or a divisor of it ({', '.join(map(str, allowed))})")


def to_float(clips: np.ndarray) -> Tensor:
    """(B, F, H, W, 3) or grayscale (B, F, H, W) uint8 -> (B, F, 3, H, W) float32,
    scaled to [0, 1] and normalized with mean 0.5, std 0.5 (so in [-1, 1])."""
    x = torch.from_numpy(np.ascontiguousarray(clips))
    if x.ndim == 4:  # grayscale: replicate to 3 channels
        x = x[:, :, None].expand(-1, -1, 3, -1, -1)
    else:
        x = x.permute(0, 1, 4, 2, 3)
    x = x.to(torch.float32).div_(255.0)
    return (x - PIXEL_MEAN) / PIXEL_STD


# ---------------------------------------------------------------- moving-mnist


def load_mnist_digits(path: Path) -> np.ndarray:
    """The MNIST idx image file -> (N, 28, 28) uint8."""
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, DIGIT_SIZE, DIGIT_SIZE)


@dataclass(frozen=True)
class BouncingMotion:
    """Where each digit of each clip is: the motion of Srivastava et al.'s script.

    Positions are fractions of the free range (64 - 28 = 36 px) in (y, x) order."""

    start: np.ndarray  # (N, D, 2) float64 position at frame 0, in [0, 1)
    velocity: np.ndarray  # (N, D, 2) float64 (vy, vx) per frame at frame 0; speed STEP_LENGTH
    corners: np.ndarray  # (N, F, D, 2) int64 top-left pixel of each digit in each frame


def bouncing_motion(rng: np.random.Generator, n_clips: int, frames: int, digits: int) -> BouncingMotion:
    """Draw a uniform start position and a random direction at speed ``STEP_LENGTH`` for
    each digit (in this order, from ``rng``), reflected at the borders."""
    start = rng.random((n_clips, digits, 2))  # (y, x) in [0, 1]
    theta = rng.random((n_clips, digits)) * 2 * np.pi
    velocity = np.stack([np.sin(theta), np.cos(theta)], axis=-1) * STEP_LENGTH  # (N, D, 2)
    t = np.arange(frames, dtype=np.float64)[None, :, None, None]  # (1, F, 1, 1)
    pos = start[:, None] + velocity[:, None] * t  # (N, F, D, 2) unfolded
    pos = np.mod(pos, 2.0)
    pos = np.where(pos > 1.0, 2.0 - pos, pos)  # reflection at 0 and 1 = triangle wave
    free = NATIVE_SIZE - DIGIT_SIZE
    corners = np.rint(pos * free).astype(np.int64)  # (N, F, D, 2) top-left corner in pixels
    return BouncingMotion(start, velocity, corners)


def render_digits(digit_images: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """(N, D, 28, 28) uint8 digits at ``corners`` (N, F, D, 2) -> (N, F, 64, 64) uint8
    clips; overlapping digits combine by max. Vectorized except for a loop over the
    digit slots."""
    n_clips, frames, digits = corners.shape[:3]
    m = n_clips * frames
    out = np.zeros((m, NATIVE_SIZE, NATIVE_SIZE), dtype=np.uint8)
    ar = np.arange(DIGIT_SIZE)
    rows = np.arange(m)[:, None, None]
    for d in range(digits):
        y = corners[:, :, d, 0].reshape(m)[:, None] + ar  # (M, 28)
        x = corners[:, :, d, 1].reshape(m)[:, None] + ar
        img = np.repeat(digit_images[:, d], frames, axis=0)  # (M, 28, 28)
        layer = np.zeros_like(out)
        layer[rows, y[:, :, None], x[:, None, :]] = img
        np.maximum(out, layer, out=out)
    return out.reshape(n_clips, frames, NATIVE_SIZE, NATIVE_SIZE)


def generate_moving_mnist(mnist: np.ndarray, n_clips: int, frames: int, digits: int,
                          seed: int = MOVING_MNIST_SEED) -> np.ndarray:
    """(n_clips, frames, 64, 64) uint8: ``digits`` random MNIST digits per clip, each with
    a uniform start position and a random direction at speed ``STEP_LENGTH`` (of the free
    range per frame), reflected at the borders; overlapping digits combine by max.

    Deterministic in its arguments (a numpy generator seeded by ``seed``): the digits
    are drawn first, then the motion (``bouncing_motion``)."""
    rng = np.random.default_rng(seed)
    which = rng.integers(0, len(mnist), size=(n_clips, digits))
    motion = bouncing_motion(rng, n_clips, frames, digits)
    return render_digits(mnist[which], motion.corners)  # mnist[which]: (N, D, 28, 28)


# Actions of the controlled digit: (dy, dx) in units of STEP_LENGTH per frame.
ACTION_MOVES = np.array([[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]], dtype=np.float64)  # stay, up, down, left, right
ACTION_NAMES = ("stay", "up", "down", "left", "right")
# The action a mirrored (horizontally flipped) clip shows: dx negated.
ACTION_MIRROR = [next(j for j, m in enumerate(ACTION_MOVES) if (m == move * [1, -1]).all()) for move in ACTION_MOVES]
ACTION_SEED_OFFSET = 1  # the actions' generator: a stream of its own (seed + 1)


def generate_moving_mnist_actions(mnist: np.ndarray, n_clips: int, frames: int, digits: int,
                                  seed: int = MOVING_MNIST_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Moving-MNIST with a controlled digit: the clips of ``generate_moving_mnist`` (same
    digits, same motion for digits 1..D-1), except that digit 0 moves by the action taken
    at each frame: action ``a_t`` (uniform over ``ACTION_MOVES``: stay, up, down, left,
    right, drawn from a generator of its own) moves it by ``STEP_LENGTH`` of the free range
    between frame t and t + 1, stopping at the borders. Returns (clips (N, F, 64, 64)
    uint8, actions (N, F) int64; the last frame's action moves nothing shown)."""
    rng = np.random.default_rng(seed)
    which = rng.integers(0, len(mnist), size=(n_clips, digits))
    motion = bouncing_motion(rng, n_clips, frames, digits)
    actions = np.random.default_rng(seed + ACTION_SEED_OFFSET).integers(0, len(ACTION_MOVES), size=(n_clips, frames))
    steps = ACTION_MOVES[actions[:, :-1]] * STEP_LENGTH  # (N, F-1, 2) the moves between frames
    pos = np.empty((n_clips, frames, 2))
    pos[:, 0] = motion.start[:, 0]
    for t in range(1, frames):  # clipped at each step: a loop over the few frames
        pos[:, t] = np.clip(pos[:, t - 1] + steps[:, t - 1], 0.0, 1.0)
    corners = motion.corners.copy()
    corners[:, :, 0] = np.rint(pos * (NATIVE_SIZE - DIGIT_SIZE)).astype(np.int64)
    return render_digits(mnist[which], corners), actions.astype(np.int64)


def _save_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".tmp.npy") as tmp:  # np.save keeps a name ending in .npy
        np.save(tmp, array)


# ---------------------------------------------------------------- datasets


class _Clips:
    """All clips (N, F, ...) of one dataset with their content keys (N,)."""

    def __init__(self, clips: np.ndarray, keys: np.ndarray, clip_kind: str, actions: np.ndarray | None = None):
        self.clips, self.keys, self.clip_kind, self.actions = clips, keys, clip_kind, actions

    def batch(self, index: np.ndarray, flips: Tensor | None = None) -> Clips:
        raw = self.clips[index]
        actions = None if self.actions is None else torch.from_numpy(self.actions[index].astype(np.int64))  # (B, F)
        if self.clip_kind == "tokens":
            x = torch.from_numpy(np.asarray(raw, dtype=np.int64))  # (B, F, h, w) ids
        else:
            x = to_float(raw)  # (B, F, 3, H, W)
            if flips is not None:
                x = torch.where(flips[:, None, None, None, None], x.flip(-1), x)
                if actions is not None:  # a mirrored clip: left and right swap
                    swapped = torch.tensor(ACTION_MIRROR)[actions]
                    actions = torch.where(flips[:, None], swapped, actions)
            x = x.contiguous()
        return Clips(clips=x, keys=torch.from_numpy(self.keys[index].astype(np.int64)), kind=self.clip_kind,
                     index=torch.from_numpy(index.astype(np.int64)), actions=actions)


class TrainBatches(StepBatches):
    """Item ``step`` is the whole batch of step ``step`` (see the module docstring)."""

    def __getitem__(self, step: int) -> Clips:
        b = self.cfg.batch_size
        index = step_draw(self.seed, step, Stream.VIDEO_BATCH, b, self.train_index)
        flips = None
        if self.data.clip_kind == "pixels" and self.cfg.flip:
            flips = to_uniform(step_bits(self.seed, step, Stream.VIDEO_FLIP, b)) < 0.5  # row b: (seed, step, b)
        return self.data.batch(index, flips)


# ---------------------------------------------------------------- data modules


@dataclass(frozen=True)
class LoadedClips:
    clips: np.ndarray  # (N, F, ...) uint8 pixels or integer ids
    keys: np.ndarray  # (N,) int64
    train_index: np.ndarray
    val_index: np.ndarray  # the whole validation split
    source: str
    split_note: str
    actions: np.ndarray | None = None  # (N, F) int64 per-frame actions (action-conditioned data)


def _last_fraction_split(n: int, field: str, value: object) -> tuple[np.ndarray, np.ndarray]:
    if n < 2:
        raise ConfigError(field, value, f"gives {n} clip(s); need >= 2 to hold out the last 10% for validation")
    n_val = max(1, round(VAL_FRACTION * n))
    return np.arange(n - n_val, dtype=np.int64), np.arange(n - n_val, n, dtype=np.int64)


class VideoDataModule(LoaderMixin, L.LightningDataModule):
    """Base of every video dataset: subclasses say where the clips come from."""

    Config = VideoDataConfig
    clip_kind: ClassVar[str] = "pixels"

    def __init__(
        self, cfg: VideoDataConfig, block_size: int, seed: int, max_steps: int, workspace: Workspace,
        steps_per_epoch: int | None = None, layout: str = "windows", plan: MaskPlan | None = None,
    ):
        """Same signature as ``TextDataModule``; ``block_size`` and ``layout`` are unused."""
        super().__init__()
        self.plan = plan
        if cfg.clip_kind != self.clip_kind:
            raise ConfigError("data.clip_kind", cfg.clip_kind,
                              f"dataset {cfg.name!r} has {self.clip_kind} clips; set data.clip_kind: {self.clip_kind}")
        self.cfg, self.seed, self.max_steps, self.workspace = cfg, seed, max_steps, workspace
        self.block_size, self.layout = block_size, layout
        self.steps_per_epoch = steps_per_epoch or max_steps
        self.data: _Clips | None = None
        self.train_index = np.zeros(0, dtype=np.int64)
        self.val_split = np.zeros(0, dtype=np.int64)
        self.val_index = np.zeros(0, dtype=np.int64)
        self.frames = cfg.frames
        self.image_size = cfg.image_size if self.clip_kind == "pixels" else 0
        self.vocab_size = cfg.vocab_size if self.clip_kind == "tokens" else 0
        self.info: dict[str, object] = {}

    def load(self) -> LoadedClips:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        loaded = self.load()
        self.data = _Clips(loaded.clips, loaded.keys, self.clip_kind, loaded.actions)
        self.train_index, self.val_split = loaded.train_index, loaded.val_index
        self.val_index = spread(self.val_split, self.cfg.val_clips)
        shape = tuple(int(s) for s in loaded.clips.shape[1:])
        self.frames = shape[0]
        if self.clip_kind == "tokens":
            self.image_size = shape[1]  # token grid height (h)
        self.info = {
            "data.source": loaded.source,
            "data.clip_kind": self.clip_kind,
            "data.clip_shape": "x".join(map(str, shape)),
            "data.n_clips": len(loaded.clips),
            "data.n_train": len(self.train_index),
            "data.n_val_split": len(self.val_split),
            "data.n_val": len(self.val_index),
            "data.frames": self.frames,
            "data.resolution": self.image_size,
            "data.split_note": loaded.split_note,
            "data.summary": f"trained on {len(self.train_index):,} {self.clip_kind} clips ({self.info_shape(shape)}) of "
                            f"{Path(loaded.source).name}; validated on {len(self.val_index):,} held-out clips",
        }
        if self.clip_kind == "pixels":
            self.info["data.normalization"] = f"(x - {PIXEL_MEAN}) / {PIXEL_STD}, x in [0, 1]"
        else:
            self.info["data.vocab_size"] = self.vocab_size

    @staticmethod
    def info_shape(shape: tuple[int, ...]) -> str:
        return f"{shape[0]} frames of {shape[1]}x{shape[2]}"

    def train_dataloader(self) -> DataLoader:
        ds = TrainBatches(self.data, self.train_index, self.cfg, self.seed, self.max_steps)
        return self.loader(Planned(ds, self.plan), batch_size=None,
                          sampler=StepSampler(self.max_steps, self.steps_per_epoch))

    def val_dataloader(self) -> DataLoader:
        ds = FixedBatches(self.data.batch, self.val_index, self.cfg.val_batch_size)
        return self.loader(ds, pin=False, batch_size=None, collate_fn=EvalCollate(self.plan))


@DATASETS.register("bbb")
class BigBuckBunny(VideoDataModule):
    """Big Buck Bunny: 45 train + 8 held-out RGB clips of 16 frames at 64x64."""

    def load(self) -> LoadedClips:
        check_image_size(self.cfg.image_size)
        path = self.workspace.data_file(BBB_FILE, "data.path")
        with np.load(path) as z:
            train, heldout = z["train"], z["heldout"]
        if self.cfg.frames > train.shape[1]:
            raise ConfigError("data.frames", self.cfg.frames, f"dataset 'bbb' has clips of {train.shape[1]} frames; use <= {train.shape[1]}")
        clips = np.concatenate([train, heldout])[:, : self.cfg.frames]  # (53, F, 64, 64, 3)
        clips = np.ascontiguousarray(pool_frames(clips, self.cfg.image_size))
        n = len(train)
        return LoadedClips(
            clips, clip_keys(clips), np.arange(n, dtype=np.int64), np.arange(n, len(clips), dtype=np.int64),
            str(path), "val = the 'heldout' clips (another part of the film), index >= 45",
        )


@DATASETS.register("moving-mnist")
class MovingMnist(VideoDataModule):
    """Moving-MNIST generated from the MNIST test digits with a fixed seed (cached)."""

    def load(self) -> LoadedClips:
        cfg = self.cfg
        check_image_size(cfg.image_size)
        _last_fraction_split(cfg.n_clips, "data.n_clips", cfg.n_clips)  # fail before generating
        mnist_path = self.workspace.data_file(MNIST_FILE, "data.path")
        stem = hashlib.sha256(
            f"v{CACHE_VERSION}|seed={MOVING_MNIST_SEED}|n={cfg.n_clips}|f={cfg.frames}|d={cfg.digits}"
            f"|s={cfg.image_size}|step={STEP_LENGTH}".encode() + (f"|actions={cfg.actions}".encode() if cfg.actions else b"")
        ).hexdigest()[:20]
        folder = self.workspace.cache_dir / "video"
        clips_path, keys_path = folder / f"moving-mnist-{stem}.npy", folder / f"moving-mnist-{stem}.keys.npy"
        actions_path = folder / f"moving-mnist-{stem}.actions.npy"
        if not (clips_path.exists() and keys_path.exists() and (actions_path.exists() or not cfg.actions)):
            folder.mkdir(parents=True, exist_ok=True)
            mnist = load_mnist_digits(mnist_path)
            if cfg.actions:
                clips, actions = generate_moving_mnist_actions(mnist, cfg.n_clips, cfg.frames, cfg.digits)
                _save_atomic(actions_path, actions)
            else:
                clips = generate_moving_mnist(mnist, cfg.n_clips, cfg.frames, cfg.digits)
            clips = np.ascontiguousarray(pool_frames(clips, cfg.image_size))
            _save_atomic(keys_path, clip_keys(clips))
            _save_atomic(clips_path, clips)
        clips = np.load(clips_path, mmap_mode="r")
        train, val = _last_fraction_split(len(clips), "data.n_clips", cfg.n_clips)
        note = f"generated from {mnist_path.name} with fixed seed {MOVING_MNIST_SEED}; val = last 10% of clips"
        if cfg.actions:
            note += "; digit 0 moved by per-frame actions (stay, up, down, left, right)"
        return LoadedClips(clips, np.load(keys_path), train, val, str(clips_path), note,
                           np.load(actions_path) if cfg.actions else None)


@DATASETS.register("video-tokens")
class VideoTokens(VideoDataModule):
    """Token clips: a .npy of integer ids (n_clips, frames, h, w), memory-mapped, or a pixel
    dataset (``data.source``) tokenized by the patch tokenizer."""

    clip_kind = "tokens"

    def load(self) -> LoadedClips:
        cfg = self.cfg
        if cfg.source:
            return self._tokenize()
        if not cfg.path:
            raise ConfigError("data.path", cfg.path,
                              "required for dataset 'video-tokens' (or data.source): a .npy of integer ids shaped "
                              "(n_clips, frames, h, w)")
        path = self.workspace.data_file(cfg.path, "data.path")
        try:
            ids = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise ConfigError("data.path", str(path), f"cannot be read as a .npy array ({e})") from None
        if ids.ndim != 4 or not np.issubdtype(ids.dtype, np.integer):
            raise ConfigError("data.path", str(path),
                              f"holds {ids.dtype} {tuple(ids.shape)}; need integer ids shaped (n_clips, frames, h, w)")
        if cfg.frames > ids.shape[1]:
            raise ConfigError("data.frames", cfg.frames, f"{path.name} has clips of {ids.shape[1]} frames; use <= {ids.shape[1]}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0:
            raise ConfigError("data.path", str(path), f"holds negative token id {lo}")
        if hi >= cfg.vocab_size:
            raise ConfigError("data.vocab_size", cfg.vocab_size, f"must be > the largest id in {path.name} ({hi})")
        clips = ids[:, : cfg.frames]
        train, val = _last_fraction_split(len(clips), "data.path", str(path))
        return LoadedClips(clips, clip_keys(clips), train, val, str(path), "val = last 10% of clips")

    def _tokenize(self) -> LoadedClips:
        """The pixel dataset ``data.source`` (same frames, size, clips), every frame cut into
        ``token_patch`` patches and each replaced by its word: a patch tokenizer of
        ``vocab_size`` words fit on the training clips' frames (scored on the validation
        clips'), both cached; the splits are the pixel dataset's. Its perplexity and PSNR
        go into the run's params (``data.tokenizer.*``)."""
        import dataclasses

        from ..patch_tokenizer import TokenizerOptions, fit, training_images
        from .images import image_keys

        cfg = self.cfg
        pixel_cfg = dataclasses.replace(cfg, name=cfg.source, clip_kind="pixels", source="", vocab_size=0)
        pixels = DATASETS.get(cfg.source)(pixel_cfg, 0, self.seed, 1, self.workspace).load()
        clips = np.asarray(pixels.clips)
        if clips.ndim == 4:  # grayscale frames: three equal channels, as the pixel models read them
            clips = np.repeat(clips[..., None], 3, axis=-1)
        n, f, size = clips.shape[0], clips.shape[1], clips.shape[2]
        frames = clips.reshape(n * f, size, size, 3)
        train_frames = frames.reshape(n, f, size, size, 3)[pixels.train_index].reshape(-1, size, size, 3)
        val_frames = frames.reshape(n, f, size, size, 3)[pixels.val_index].reshape(-1, size, size, 3)
        options = TokenizerOptions(codebook_size=cfg.vocab_size, patch_size=cfg.token_patch, seed=0)
        pick = training_images(image_keys(train_frames), (size // cfg.token_patch) ** 2, options.max_patches)
        tok = fit(train_frames[pick], image_keys(train_frames[pick]), val_frames, options, self.workspace.cache_dir)
        # The ids depend on the clips and the codebook (not on the actions).
        stem = hashlib.sha256(np.ascontiguousarray(pixels.keys).tobytes() + tok.centroids.numpy().tobytes()).hexdigest()[:20]
        path = self.workspace.cache_dir / "video" / f"tokens-{cfg.source}-{stem}.npy"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            grid = size // cfg.token_patch
            images = torch.from_numpy(frames).permute(0, 3, 1, 2)
            ids = torch.cat([tok.encode(part.float() / 255) for part in images.split(4096)])  # (n * F, h * w)
            _save_atomic(path, ids.reshape(n, f, grid, grid).numpy())  # int64 ids
        ids = np.load(path, mmap_mode="r")
        self.tokenizer_stats = tok.stats
        return LoadedClips(ids, clip_keys(ids), pixels.train_index, pixels.val_index, str(path),
                           f"{cfg.source} clips tokenized by the patch tokenizer ({cfg.vocab_size} words of "
                           f"{cfg.token_patch}x{cfg.token_patch} patches, fit on the training clips); "
                           f"{pixels.split_note}", pixels.actions)

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        for k, v in getattr(self, "tokenizer_stats", {}).items():
            self.info[f"data.tokenizer.{k}"] = round(v, 4)


def decode_video_file(path: Path, image_size: int) -> np.ndarray:
    """Every frame of a video file, center-cropped to a square and resized to
    ``image_size`` (bicubic): (T, S, S, 3) uint8. Needs PyAV (the ``video`` extra)."""
    try:
        import av
    except ImportError:
        raise ConfigError("data.name", "video-file", "decoding video files needs PyAV: pip install 'masklab[video]'") from None
    from PIL import Image

    frames = []
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                img = frame.to_image()  # RGB PIL image
                w, h = img.size
                side = min(w, h)
                left, top = (w - side) // 2, (h - side) // 2
                img = img.crop((left, top, left + side, top + side)).resize((image_size, image_size), Image.BICUBIC)
                frames.append(np.asarray(img, dtype=np.uint8))
    except av.error.FFmpegError as e:
        raise ConfigError("data.path", str(path), f"cannot be decoded as video ({e})") from None
    if not frames:
        raise ConfigError("data.path", str(path), "holds no video frames")
    return np.stack(frames)


@DATASETS.register("video-file")
class VideoFile(VideoDataModule):
    """A video file (webm, mp4, ...) decoded with PyAV into consecutive non-overlapping
    clips of ``frames`` frames (the tail is dropped), cached; val = the last 10%."""

    def load(self) -> LoadedClips:
        cfg = self.cfg
        if not cfg.path:
            raise ConfigError("data.path", cfg.path, "required for dataset 'video-file': a video file (webm, mp4, ...)")
        path = self.workspace.data_file(cfg.path, "data.path")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        stem = f"{path.stem}-{digest}-s{cfg.image_size}-f{cfg.frames}"
        folder = self.workspace.cache_dir / "video"
        clips_path, keys_path = folder / f"{stem}.npy", folder / f"{stem}.keys.npy"
        if not (clips_path.exists() and keys_path.exists()):
            frames = decode_video_file(path, cfg.image_size)  # (T, S, S, 3)
            n = len(frames) // cfg.frames
            if n < 2:
                raise ConfigError("data.frames", cfg.frames, f"{path.name} has {len(frames)} frames: fewer than 2 clips")
            clips = np.ascontiguousarray(frames[: n * cfg.frames].reshape(n, cfg.frames, *frames.shape[1:]))
            folder.mkdir(parents=True, exist_ok=True)
            _save_atomic(keys_path, clip_keys(clips))
            _save_atomic(clips_path, clips)
        clips = np.load(clips_path, mmap_mode="r")
        train, val = _last_fraction_split(len(clips), "data.path", str(path))
        return LoadedClips(clips, np.load(keys_path), train, val, str(path),
                           f"{len(clips)} consecutive clips decoded with PyAV; val = last 10%")
