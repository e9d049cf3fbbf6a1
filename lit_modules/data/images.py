"""Image datasets -> decoded uint8 pixels in a .npy memmap -> augmented step batches.

Each dataset is decoded once with Pillow to RGB uint8 ``(N, S, S, 3)`` and cached in the
workspace cache dir under a hash of the encoded files and ``image_size``; later runs
memmap the cache. Every batch is a ``masking.batches.Images``::

    images  (B, 3, S, S) float32   in [0, 1], or ImageNet-normalized if cfg.normalize
    labels  (B,)         int64     class index
    keys    (B,)         int64     content key of the un-augmented image (``image_keys``)
    index   (B,)         int64     position of the image in the dataset

Image sets whose decoded pixels would exceed ``data.cache_limit_gb`` (ImageNet at 224 px:
~190 GB) are not cached: ``DecodedOnRead`` decodes each image when its batch is
assembled, in the DataLoader workers, and the content keys of their masks are hashes of
the encoded bytes (``encoded_keys``), which need no decoding; an image folder is then
read file by file (``FileBlobs``), never held in memory whole. Cached sets keep the keys of
their decoded pixels, so their masks are those of earlier runs.

Train/val split: an image is in the validation split when a 64-bit hash of its encoded
bytes is below ``val_fraction * 2**64``: the same in every trial and seed, and a larger
fraction holds out a superset. Training batches are drawn (with replacement) from the
train split by a counter-based hash of ``(seed, step)``, and their augmentation (MAE's
RandomResizedCrop + horizontal flip) by a hash of ``(seed, step, row)``: batch ``step``
is identical in every run with that seed. Validation and probe batches are fixed images
in index order, never augmented.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ..config_errors import ConfigError
from ..masking.batches import Images
from ..masking.plan import MaskPlan
from ..masking.rng import Stream, step_bits, to_uniform
from ..paths import Workspace, atomic_path, atomic_write
from ..registry import DATASETS
from .configs import ImageDataConfig
from .loading import LoaderMixin
from .masked import EvalCollate, Planned
from .steps import FixedBatches, StepBatches, StepSampler, step_draw

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# RandomResizedCrop as in torchvision (used by MAE): aspect ratios in [3/4, 4/3] and 10
# tries to find a box inside the image before falling back to the whole image.
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
# Bump when the cache layout or the decoding changes, so old caches are not reused.
CACHE_VERSION = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class RawImages:
    """A dataset before decoding: encoded files (JPEG/PNG bytes) in dataset order."""

    blobs: Sequence[bytes]
    labels: np.ndarray  # (N,) int64
    class_names: list[str]
    source: str  # what was read, for the run record
    names: Sequence[str]  # one per image, for error messages


# ---------------------------------------------------------------- hashing


def _hash64(blobs: Sequence[bytes], person: bytes) -> np.ndarray:
    """(N,) 64-bit blake2b of each blob, as little-endian int64."""
    digests = b"".join(hashlib.blake2b(b, digest_size=8, person=person).digest() for b in blobs)
    return np.frombuffer(digests, dtype="<i8").astype(np.int64)


def image_keys(pixels: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N,) int64 content keys: 64-bit blake2b of the pixel bytes.

    Same role as ``rng.content_key`` (a stable hash of the sample's content), but
    ``content_key`` over 10,000 images of 64x64x3 takes about a minute on a CPU, blake2b
    a tenth of a second."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    return _hash64([p.tobytes() for p in pixels], b"masklab-key")


def encoded_keys(blobs: Sequence[bytes]) -> np.ndarray:
    """(N,) int64 content keys of images that are not cached: 64-bit blake2b of the
    encoded bytes (the same file gives the same key on every machine, before decoding)."""
    return _hash64(blobs, b"masklab-key-enc")


def split_is_val(blobs: Sequence[bytes], val_fraction: float) -> np.ndarray:
    """(N,) bool: the image is held out when the hash of its encoded bytes, read as a
    fraction of 2**64, is below ``val_fraction``. Independent of seed and image_size."""
    h = _hash64(blobs, b"masklab-split").view(np.uint64)
    return h < np.uint64(int(val_fraction * 2.0**64))


# ---------------------------------------------------------------- decoding + cache


def _decode(blob: bytes, name: str, image_size: int):
    """One encoded image -> RGB uint8 (H, W, 3); resized (shorter side) and
    center-cropped to ``image_size`` when it is not 0."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(blob))
        img = img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ConfigError("data.path", name, f"cannot be decoded as an image ({e})") from None
    if image_size and img.size != (image_size, image_size):
        w, h = img.size
        scale = image_size / min(w, h)
        nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - image_size) // 2, (nh - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
    return np.asarray(img, dtype=np.uint8)


def _check_size(arr: np.ndarray, name: str, image_size: int, first: tuple[int, int] | None) -> None:
    h, w = arr.shape[:2]
    if first is not None and (h, w) != first:
        raise ConfigError(
            "data.image_size", image_size,
            f"images differ in size ({first[1]}x{first[0]} and {w}x{h} in {name}); "
            f"set data.image_size (e.g. {min(h, w, *first)}) to resize them all",
        )
    if h != w:
        raise ConfigError(
            "data.image_size", image_size,
            f"{name} is {w}x{h} (width x height), not square; set data.image_size (e.g. {min(h, w)}) "
            "to resize the shorter side and center-crop",
        )


def decode_to_memmap(raw: RawImages, image_size: int, cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image once into ``cache_dir/images/<hash>.npy`` (N, S, S, 3) uint8
    plus its content keys (N,) int64; return (pixels memmap, keys).

    The cache is keyed by the encoded bytes and ``image_size``. Files are written to a
    temporary name and renamed, so concurrent workers never read a half-written cache."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}|size={image_size}|n={len(raw.blobs)}|".encode())
    for blob in raw.blobs:
        digest.update(len(blob).to_bytes(8, "little"))
        digest.update(blob)
    stem = digest.hexdigest()[:20]
    folder = cache_dir / "images"
    pixels_path, keys_path = folder / f"{stem}.npy", folder / f"{stem}.keys.npy"
    if not (pixels_path.exists() and keys_path.exists()):
        folder.mkdir(parents=True, exist_ok=True)
        _decode_all(raw, image_size, pixels_path, keys_path)
    return np.load(pixels_path, mmap_mode="r"), np.load(keys_path)


def _decode_all(raw: RawImages, image_size: int, pixels_path: Path, keys_path: Path) -> None:
    first = _decode(raw.blobs[0], raw.names[0], image_size)
    _check_size(first, raw.names[0], image_size, None)
    s = first.shape[0]
    with atomic_path(pixels_path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(raw.blobs), s, s, 3))
        out[0] = first
        for i in range(1, len(raw.blobs)):
            arr = _decode(raw.blobs[i], raw.names[i], image_size)
            _check_size(arr, raw.names[i], image_size, (s, s))
            out[i] = arr
        out.flush()
        keys = image_keys(out)
        del out
        buf = io.BytesIO()
        np.save(buf, keys)
        atomic_write(keys_path, buf.getvalue())


class FileBlobs(Sequence):
    """The encoded bytes of image files, read when asked for (a folder of a million
    images is never held in memory)."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [p.read_bytes() for p in self.paths[i]]
        return self.paths[i].read_bytes()


class DecodedOnRead:
    """Pixels decoded when indexed, in place of the cache: ``pixels[index]`` (an index
    array) -> (B, S, S, 3) uint8, each image decoded and resized as ``_decode`` does for
    the cache (the same pixels)."""

    def __init__(self, raw: RawImages, image_size: int, side: int):
        self.blobs, self.names, self.image_size, self.side = raw.blobs, raw.names, image_size, side

    def __len__(self) -> int:
        return len(self.blobs)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.blobs), self.side, self.side, 3)

    def __getitem__(self, index) -> np.ndarray:
        out = np.empty((len(index), self.side, self.side, 3), dtype=np.uint8)
        for row, i in enumerate(np.asarray(index).tolist()):
            arr = _decode(self.blobs[i], self.names[i], self.image_size)
            _check_size(arr, self.names[i], self.image_size, (self.side, self.side))
            out[row] = arr
        return out


def pixel_source(raw: RawImages, image_size: int, cache_dir: Path, limit_gb: float):
    """(pixels, keys, how): the memmapped cache when the decoded set fits ``limit_gb``,
    else ``DecodedOnRead`` with keys of the encoded bytes; ``how`` says which, for the
    run record."""
    first = _decode(raw.blobs[0], raw.names[0], image_size)
    _check_size(first, raw.names[0], image_size, None)
    side = first.shape[0]
    gb = len(raw.blobs) * side * side * 3 / 1e9
    if gb <= limit_gb:
        pixels, keys = decode_to_memmap(raw, image_size, cache_dir)
        return pixels, keys, f"cached: {gb:.3g} GB of decoded pixels (data.cache_limit_gb {limit_gb:g})"
    return (DecodedOnRead(raw, image_size, side), encoded_keys(raw.blobs),
            f"decoded on the fly in the loader: {gb:.3g} GB of pixels > data.cache_limit_gb {limit_gb:g}; "
            "mask keys = blake2b-64 of the encoded bytes")


# ---------------------------------------------------------------- tensors and augmentation


def to_float(pixels: np.ndarray, normalize: bool) -> Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [0, 1], or ImageNet-normalized."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)
    x = x.to(torch.float32).div_(255.0)
    return normalize_images(x) if normalize else x


def normalize_images(x: Tensor) -> Tensor:
    """(B, 3, H, W) in [0, 1] -> (x - ImageNet mean) / ImageNet std, per channel."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device)[None, :, None, None]
    return (x - mean) / std


def denormalize_images(x: Tensor) -> Tensor:
    """The inverse of ``normalize_images``: back to [0, 1] pixels."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device)[None, :, None, None]
    return x * std + mean


def crop_params(u: Tensor, size: int, scale_min: float) -> tuple[Tensor, Tensor]:
    """RandomResizedCrop boxes and flips from uniforms ``u`` (B, 4 * CROP_ATTEMPTS + 1).

    Returns boxes (B, 4) int64 ``x0, y0, w, h`` in pixels of a square ``size`` image, and
    flips (B,) bool. Like torchvision: each attempt draws an area fraction in
    [scale_min, 1] and a log-uniform aspect ratio in [3/4, 4/3]; the first box that fits
    wins; if none fits, the whole image. Vectorized over the batch."""
    b = u.shape[0]
    a = u[:, : 4 * CROP_ATTEMPTS].reshape(b, CROP_ATTEMPTS, 4)  # (B, A, 4)
    area = size * size * (scale_min + (1.0 - scale_min) * a[..., 0])
    lo, hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    aspect = torch.exp(lo + (hi - lo) * a[..., 1])
    w = torch.round(torch.sqrt(area * aspect)).to(torch.int64)  # (B, A)
    h = torch.round(torch.sqrt(area / aspect)).to(torch.int64)
    fits = (w >= 1) & (w <= size) & (h >= 1) & (h <= size)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # (B, 1) first fitting attempt
    found = fits.any(dim=1)
    w = torch.where(found, w.gather(1, first)[:, 0], size)  # (B,)
    h = torch.where(found, h.gather(1, first)[:, 0], size)
    ux, uy = a[..., 2].gather(1, first)[:, 0], a[..., 3].gather(1, first)[:, 0]
    x0 = torch.minimum(torch.floor(ux * (size - w + 1)).to(torch.int64), size - w)  # u < 1: safety only
    y0 = torch.minimum(torch.floor(uy * (size - h + 1)).to(torch.int64), size - h)
    flips = u[:, 4 * CROP_ATTEMPTS] < 0.5
    return torch.stack([x0, y0, w, h], dim=1), flips


def _bilinear_weights(start: Tensor, length: Tensor, size: int, n_in: int) -> Tensor:
    """(B, size, n_in) weights that resample pixels [start, start + length) of an axis of
    ``n_in`` pixels to ``size`` pixels: bilinear with align_corners=False and edges
    clamped to the crop, i.e. exactly ``F.interpolate`` of the cropped image."""
    start = start.to(torch.float32)[:, None]  # (B, 1)
    last = start + length.to(torch.float32)[:, None] - 1
    i = torch.arange(size, dtype=torch.float32)[None, :]  # (1, size)
    src = start + (i + 0.5) * (last - start + 1) / size - 0.5  # (B, size) source coordinate
    src = torch.minimum(torch.maximum(src, start), last)
    lo = src.floor()
    frac = src - lo
    hi = torch.minimum(lo + 1, last)
    w = torch.zeros(src.shape[0], size, n_in)
    w.scatter_add_(2, lo.to(torch.int64)[..., None], (1 - frac)[..., None])
    w.scatter_add_(2, hi.to(torch.int64)[..., None], frac[..., None])
    return w


def resized_crop(x: Tensor, boxes: Tensor, flips: Tensor) -> Tensor:
    """Crop box ``boxes[b]`` (x0, y0, w, h) of each image, resized bilinearly to the full
    image size and mirrored where ``flips[b]``: (B, C, H, W) -> (B, C, H, W).

    Separable resampling as two batched matmuls (out = Wy @ crop @ Wx^T), the same
    numbers as a per-image ``F.interpolate(crop, mode="bilinear")``. Crops are never
    larger than the image, so this only upsamples and needs no antialiasing."""
    b, c, hh, ww = x.shape
    x0, y0, w, h = boxes.unbind(1)  # (B,) each
    wy = _bilinear_weights(y0, h, hh, hh)  # (B, H_out, H_in)
    wx = _bilinear_weights(x0, w, ww, ww)  # (B, W_out, W_in)
    wx = torch.where(flips[:, None, None], wx.flip(1), wx)  # mirrored output columns
    rows = torch.bmm(wy, x.permute(0, 2, 1, 3).reshape(b, hh, c * ww))  # (B, H, C*W)
    out = torch.bmm(rows.reshape(b, hh * c, ww), wx.transpose(1, 2))  # (B, H*C, W)
    return out.reshape(b, hh, c, ww).permute(0, 2, 1, 3).contiguous()  # (B, C, H, W)


# ---------------------------------------------------------------- datasets


class _Images:
    """The decoded dataset: pixels (N, S, S, 3) uint8 memmap, labels and keys (N,)."""

    def __init__(self, pixels: np.ndarray, labels: np.ndarray, keys: np.ndarray, normalize: bool):
        self.pixels, self.labels, self.keys, self.normalize = pixels, labels, keys, normalize

    def batch(self, index: np.ndarray, images: Tensor | None = None) -> Images:
        if images is None:
            images = to_float(self.pixels[index], self.normalize)
        return Images(
            images=images,
            keys=torch.from_numpy(self.keys[index].astype(np.int64)),
            labels=torch.from_numpy(self.labels[index].astype(np.int64)),
            index=torch.from_numpy(index.astype(np.int64)),
        )


class TrainBatches(StepBatches):
    """Item ``step`` is the whole batch of step ``step`` (see the module docstring)."""

    def __getitem__(self, step: int) -> Images:
        b = self.cfg.batch_size
        index = step_draw(self.seed, step, Stream.IMAGE_BATCH, b, self.train_index)
        x = to_float(self.data.pixels[index], normalize=False)  # (B, 3, S, S) in [0, 1]
        if self.cfg.augment:
            n = 4 * CROP_ATTEMPTS + 1
            u = to_uniform(step_bits(self.seed, step, Stream.IMAGE_AUG, b * n)).view(b, n)  # row b: (seed, step, b)
            boxes, flips = crop_params(u, x.shape[-1], self.cfg.crop_scale_min)
            x = resized_crop(x, boxes, flips)
        if self.cfg.normalize:
            x = normalize_images(x)
        return self.data.batch(index, x)


def spread(index: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` entries of ``index``, evenly spread, in order (0 = all)."""
    if not limit or len(index) <= limit:
        return index
    return index[np.unique(np.linspace(0, len(index) - 1, limit).round().astype(np.int64))]


# ---------------------------------------------------------------- data modules


class ImageDataModule(LoaderMixin, L.LightningDataModule):
    """Base of every image dataset: subclasses say where the encoded images come from."""

    Config = ImageDataConfig

    def __init__(
        self, cfg: ImageDataConfig, block_size: int, seed: int, max_steps: int, workspace: Workspace,
        steps_per_epoch: int | None = None, layout: str = "windows", plan: MaskPlan | None = None,
    ):
        """Same signature as ``TextDataModule``; ``block_size`` and ``layout`` are unused."""
        super().__init__()
        self.plan = plan
        self.cfg, self.seed, self.max_steps, self.workspace = cfg, seed, max_steps, workspace
        self.block_size, self.layout = block_size, layout
        self.steps_per_epoch = steps_per_epoch or max_steps
        self.data: _Images | None = None
        self.train_index = np.zeros(0, dtype=np.int64)  # train split, dataset order
        self.val_split = np.zeros(0, dtype=np.int64)  # whole validation split
        self.val_index = np.zeros(0, dtype=np.int64)  # the validation images used (capped)
        self.num_classes = 0
        self.image_size = 0
        self.class_names: list[str] = []
        self.info: dict[str, object] = {}

    def read_raw(self) -> RawImages:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        raw = self.read_raw()
        pixels, keys, how = pixel_source(raw, self.cfg.image_size, self.workspace.cache_dir, self.cfg.cache_limit_gb)
        self.data = _Images(pixels, raw.labels.astype(np.int64), keys, self.cfg.normalize)
        is_val = split_is_val(raw.blobs, self.cfg.val_fraction)
        self.train_index = np.flatnonzero(~is_val).astype(np.int64)
        self.val_split = np.flatnonzero(is_val).astype(np.int64)
        for split, idx in (("train", self.train_index), ("validation", self.val_split)):
            if len(idx) == 0:
                raise ConfigError("data.val_fraction", self.cfg.val_fraction,
                                  f"leaves no {split} images among the {len(pixels)} of {raw.source}")
        self.val_index = spread(self.val_split, self.cfg.val_images)
        self.num_classes = len(raw.class_names)
        self.class_names = list(raw.class_names)
        self.image_size = int(pixels.shape[1])
        frac = self.cfg.val_fraction
        self.info = {
            "data.source": raw.source,
            "data.cache_file": Path(pixels.filename).name if isinstance(pixels, np.memmap) else "",
            "data.pixels": how,
            "data.n_images": len(pixels),
            "data.n_train": len(self.train_index),
            "data.n_val_split": len(self.val_split),
            "data.n_val": len(self.val_index),
            "data.num_classes": self.num_classes,
            "data.resolution": self.image_size,
            "data.split_note": f"val = images whose blake2b-64 of the encoded bytes < {frac} * 2**64 "
                               "(same in every trial and seed)",
            "data.summary": f"trained on {len(self.train_index):,} images of {Path(raw.source).name}; validated on "
                            f"{len(self.val_index):,} held-out images ({self.num_classes} classes, "
                            f"{self.image_size}x{self.image_size})",
        }

    def train_dataloader(self) -> DataLoader:
        ds = TrainBatches(self.data, self.train_index, self.cfg, self.seed, self.max_steps)
        return self.loader(Planned(ds, self.plan), batch_size=None,
                          sampler=StepSampler(self.max_steps, self.steps_per_epoch))

    def val_dataloader(self) -> DataLoader:
        ds = FixedBatches(self.data.batch, self.val_index, self.cfg.val_batch_size)
        return self.loader(ds, pin=False, batch_size=None, collate_fn=EvalCollate(self.plan))

    def probe_dataloaders(self, train_images: int = 2000, batch_size: int | None = None) -> tuple[DataLoader, DataLoader]:
        """(train, val) loaders of un-augmented images for a linear probe: train = at
        most ``train_images`` train-split images evenly spread, val = the validation set."""
        bs = batch_size or self.cfg.val_batch_size
        train = FixedBatches(self.data.batch, spread(self.train_index, train_images), bs)
        return DataLoader(train, batch_size=None), DataLoader(FixedBatches(self.data.batch, self.val_index, bs), batch_size=None)

    # helper for subclasses
    def _read_npz(self, relative: str) -> RawImages:
        path = self.workspace.data_file(relative, "data.path")
        with np.load(path) as z:
            jpeg, offsets = z["jpeg"], z["offsets"]
            labels = z["labels"].astype(np.int64)
            class_names = [str(c) for c in z["class_names"]]
            names = [str(n) for n in z["filenames"]]
        blobs = [jpeg[offsets[i] : offsets[i + 1]].tobytes() for i in range(len(offsets) - 1)]
        return RawImages(blobs, labels, class_names, str(path), names)


@DATASETS.register("tiny-imagenet")
class TinyImageNet(ImageDataModule):
    """Tiny-ImageNet-200 validation split: 10,000 JPEGs of 64x64, 200 classes."""

    def read_raw(self) -> RawImages:
        return self._read_npz("tiny-imagenet-200-val/tiny_imagenet_200_val.npz")


@DATASETS.register("cifar10")
class Cifar10(ImageDataModule):
    """CIFAR-10 test set as quality-75 JPEGs: 10,000 images of 32x32, 10 classes."""

    def read_raw(self) -> RawImages:
        return self._read_npz("cifar10-test-jpeg/cifar10_test_jpeg.npz")


@DATASETS.register("image-folder")
class ImageFolder(ImageDataModule):
    """A local folder of PNG/JPEG files: one subfolder per class (labels in sorted
    subfolder order), or no subfolders (every label 0). Hidden files are skipped."""

    def read_raw(self) -> RawImages:
        if not self.cfg.path:
            raise ConfigError("data.path", self.cfg.path,
                              "required for dataset 'image-folder': a folder of PNG/JPEG files (one subfolder per class, or none)")
        root = self.workspace.data_file(self.cfg.path, "data.path")
        if not root.is_dir():
            raise ConfigError("data.path", str(root), "must be a folder of PNG/JPEG files")
        files = sorted(
            (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(root).parts)),
            key=lambda p: p.relative_to(root).as_posix(),
        )
        if not files:
            raise ConfigError("data.path", str(root), f"holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        rel = [f.relative_to(root) for f in files]
        nested = [len(r.parts) > 1 for r in rel]
        if any(nested) and not all(nested):
            top = next(r for r, n in zip(rel, nested) if not n)
            raise ConfigError("data.path", str(root), f"mixes top-level images ({top}) with class subfolders; "
                                                      "put every image in a class subfolder, or none")
        class_names = sorted({r.parts[0] for r in rel}) if any(nested) else ["all"]
        lookup = {c: i for i, c in enumerate(class_names)}
        labels = np.array([lookup[r.parts[0]] if len(r.parts) > 1 else 0 for r in rel], dtype=np.int64)
        return RawImages(FileBlobs(files), labels, class_names, str(root), [str(f) for f in files])
