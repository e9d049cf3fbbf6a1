"""The labelled tasks: rows split three ways, disjoint by content, for probes and baselines.

Each task gives ``train`` (fits a probe), ``select`` (held-out training rows that only
choose the probe's regularization) and ``eval`` (scored once). Every row has a content
key (blake2b-64 as int64), and the splits are disjoint by key: rows of train and
select whose key is in eval are dropped, and rows of train whose key is in select
(counted in ``TaskData.source``). Then each split keeps at most its cap of rows: the
``cap`` rows with the smallest key (read as unsigned), in their original order, a
hash-uniform subset that is the same on every machine.

| task | inputs | target | train / select / eval |
|---|---|---|---|
| ``sst2`` | text | 2 classes | sst-2 train.tsv / dev.tsv / test.tsv (GLUE dev) |
| ``agnews`` | text | 4 classes | ag-news dev.tsv (key fraction >= 0.1 / < 0.1) / test.tsv |
| ``cifar10``, ``tiny-imagenet`` | images | 10 / 200 classes | the pretraining split (below) |
| ``moving-mnist-digits`` | clips | the 2 digits' classes (multi-hot of 10) | disjoint digit pools |
| ``moving-mnist-velocity`` | clips | (vy, vx) of both digits at frame 0 | the same clips |

Images use the split of a default-config image run (``ImageDataConfig().val_fraction``):
eval = ``split_is_val(blobs, 0.1)``, the images that run held out, so a probe is never
scored on an image the encoder was pretrained on; select = the images with the same hash
in [0.1, 0.2); train = the rest. Pixels are decoded once at ``image_size`` (0 = native)
into the shared image cache (``decode_to_memmap``).

Clips: the 10,000 MNIST test digits are split by a hash of their pixels into three
disjoint pools (eval < 0.1 <= select < 0.2 <= train), so no digit image of an eval clip
is in a train clip. Each clip shows 2 digits of distinct classes moving as in
``data.video.generate_moving_mnist`` (the same ``bouncing_motion``), ``frames`` frames
of 64x64 (average-pooled to ``image_size`` when that is neither 0 nor 64); a split has
as many clips as its cap, drawn by a numpy generator with a fixed seed per split.
Velocities are (vy, vx) in fractions of the free range (64 - 28 px) per frame, speed 0.1,
the lower class's digit first.

This module imports no torch: the image and video modules are imported when a task of
theirs is loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ..config_errors import ConfigError
from ..paths import Workspace
from .names import DIGITS_PER_CLIP, TASK_INPUT_KIND, TASK_TARGET, chance_level

__all__ = ["TASKS", "TASK_INPUT_KIND", "TASK_TARGET", "Split", "TaskData", "chance", "fingerprint",
           "digit_pools", "labelled_moving_mnist", "load_task", "text_keys"]

SELECT_FRACTION = 0.1  # images and AG News: the share of the training data held out as select
AGNEWS_CLASSES = ["World", "Sports", "Business", "Sci/Tech"]
MNIST_LABELS = "mnist/t10k-labels-idx1-ubyte.gz"
CLIP_DIGITS = DIGITS_PER_CLIP  # digits per labelled clip, of distinct classes
# Per-split generator seeds of the labelled clips: fixed (never the run seed), distinct
# from each other and from the pretraining clips' MOVING_MNIST_SEED.
CLIP_SEEDS = {"train": 1, "select": 2, "eval": 3}
# " #39;" in AG News is "&#39;" whose "&" became a space in the source: the entity and
# the space before it are one character.
_AG_ENTITY = re.compile(r" #(\d+);")


@dataclass(frozen=True)
class Split:
    x: list[str] | np.ndarray  # texts; images (N, H, W, 3) uint8; clips (N, F, H, W) uint8 grayscale
    y: np.ndarray  # class: (N,) int64; multilabel: (N, K) float32 multi-hot; regression: (N, K) float32
    keys: np.ndarray  # (N,) int64 content hash of each row

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class TaskData:
    name: str
    input_kind: Literal["text", "image", "clip"]
    target: Literal["class", "multilabel", "regression"]
    num_outputs: int  # classes, or label/regression outputs
    class_names: list[str]
    train: Split
    select: Split  # held-out training rows, used only to choose regularization
    eval: Split
    source: str  # one line: files read, how split, rows per split, rows dropped, fingerprint


@dataclass(frozen=True)
class _Rows:
    """A task's rows before the splits are made disjoint and capped: ``parts`` holds
    the row indices of each split into ``x``, ``y`` and ``keys``."""

    x: Sequence  # list of texts, or an array (memmap) indexed by row
    y: np.ndarray
    keys: np.ndarray
    parts: dict[str, np.ndarray]  # "train", "select", "eval" -> (n,) int64
    class_names: list[str]
    num_outputs: int
    source: str  # files read and how they were split


@dataclass(frozen=True)
class _Request:
    workspace: Workspace  # finds the data files (its output_dir is unused)
    cache_dir: Path
    caps: dict[str, int]
    image_size: int
    frames: int


# ---------------------------------------------------------------- keys


def text_keys(texts: Sequence[str]) -> np.ndarray:
    """(N,) int64: 64-bit blake2b of each text stripped and lower-cased."""
    digests = b"".join(hashlib.blake2b(t.strip().lower().encode(), digest_size=8, person=b"masklab-text").digest()
                       for t in texts)
    return np.frombuffer(digests, dtype="<i8").astype(np.int64)


def _fraction(keys: np.ndarray) -> np.ndarray:
    """(N,) float64 in [0, 1): the key read as an unsigned fraction of 2**64."""
    return keys.view(np.uint64) / 2.0**64


def _data_file(req: _Request, relative: str) -> Path:
    """A file under the data dir; the workspace's one-line error when it is missing."""
    return req.workspace.data_file(relative, "data.path")


# ---------------------------------------------------------------- text


def _read_tsv(path: Path, header: bool, label: Callable[[str], int]) -> tuple[list[str], np.ndarray]:
    """``text<TAB>label`` rows -> (texts stripped, labels (N,) int64)."""
    texts, labels = [], []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines[1:] if header else lines, start=2 if header else 1):
        text, sep, value = line.rpartition("\t")
        try:
            labels.append(label(value.strip()) if sep else -1)
        except (KeyError, ValueError):
            labels.append(-1)
        if labels[-1] < 0:
            raise ConfigError("data.path", str(path), f"line {i} is not 'text<TAB>label' with a known label")
        texts.append(text.strip())
    return texts, np.asarray(labels, dtype=np.int64)


def _binary(value: str) -> int:
    return {"0": 0, "1": 1}[value]


def _text_rows(parts: dict[str, tuple[list[str], np.ndarray]], class_names: list[str], source: str) -> _Rows:
    texts: list[str] = []
    ys, idx = [], {}
    for name, (t, y) in parts.items():
        idx[name] = np.arange(len(texts), len(texts) + len(t), dtype=np.int64)
        texts += t
        ys.append(y)
    return _Rows(texts, np.concatenate(ys), text_keys(texts), idx, class_names, len(class_names), source)


def _sst2(req: _Request) -> _Rows:
    files = {s: _data_file(req, f"sst-2/{f}.tsv") for s, f in (("train", "train"), ("select", "dev"), ("eval", "test"))}
    parts = {s: _read_tsv(p, header=True, label=_binary) for s, p in files.items()}
    return _text_rows(parts, ["negative", "positive"], "sst-2: train = train.tsv, select = dev.tsv, eval = test.tsv")


def _agnews(req: _Request) -> _Rows:
    lookup = {c: i for i, c in enumerate(AGNEWS_CLASSES)}
    dev_t, dev_y = _read_tsv(_data_file(req, "ag-news/dev.tsv"), header=False, label=lookup.__getitem__)
    test_t, test_y = _read_tsv(_data_file(req, "ag-news/test.tsv"), header=False, label=lookup.__getitem__)
    dev_t, test_t = [_fix_entities(t) for t in dev_t], [_fix_entities(t) for t in test_t]
    is_select = _fraction(text_keys(dev_t)) < SELECT_FRACTION
    parts = {
        "train": ([t for t, s in zip(dev_t, is_select) if not s], dev_y[~is_select]),
        "select": ([t for t, s in zip(dev_t, is_select) if s], dev_y[is_select]),
        "eval": (test_t, test_y),
    }
    return _text_rows(parts, list(AGNEWS_CLASSES),
                      f"ag-news: train/select = dev.tsv by text-key fraction >= / < {SELECT_FRACTION}, "
                      "eval = test.tsv; ' #NN;' entities decoded")


def _fix_entities(text: str) -> str:
    """' #39;' -> "'", ' #36;' -> '$' (see ``_AG_ENTITY``); nothing else is changed."""
    return _AG_ENTITY.sub(lambda m: html.unescape(f"&#{m.group(1)};"), text)


# ---------------------------------------------------------------- images


def _images(dataset: str) -> Callable[[_Request], _Rows]:
    def load(req: _Request) -> _Rows:
        from ..data.configs import ImageDataConfig
        from ..data.images import decode_to_memmap, split_is_val
        from ..registry import DATASETS

        cfg = ImageDataConfig(name=dataset)
        raw = DATASETS.get(dataset)(cfg, 0, 0, 1, req.workspace).read_raw()  # the pretraining run's files
        pixels, keys = decode_to_memmap(raw, req.image_size, req.cache_dir)
        held_out = split_is_val(raw.blobs, cfg.val_fraction)
        select = split_is_val(raw.blobs, cfg.val_fraction + SELECT_FRACTION) & ~held_out
        parts = {"train": np.flatnonzero(~held_out & ~select), "select": np.flatnonzero(select),
                 "eval": np.flatnonzero(held_out)}
        f = cfg.val_fraction
        return _Rows(pixels, raw.labels.astype(np.int64), keys, parts, list(raw.class_names), len(raw.class_names),
                     f"{Path(raw.source).name} at {pixels.shape[1]}x{pixels.shape[2]}: eval = split hash < {f} "
                     f"(held out by pretraining), select = [{f}, {f + SELECT_FRACTION}), train = the rest")

    return load


# ---------------------------------------------------------------- clips


@dataclass(frozen=True)
class LabelledClips:
    clips: np.ndarray  # (N, F, 64, 64) uint8
    which: np.ndarray  # (N, 2) int64 MNIST image of each digit slot
    velocity: np.ndarray  # (N, 2, 2) float64 (vy, vx) of each digit slot at frame 0
    corners: np.ndarray  # (N, F, 2, 2) int64 top-left pixel of each digit slot per frame


def labelled_moving_mnist(mnist: np.ndarray, labels: np.ndarray, pool: np.ndarray, n_clips: int, frames: int,
                          seed: int) -> LabelledClips:
    """``n_clips`` clips of 2 digits of distinct classes from the MNIST images ``pool``.

    The first digit is uniform over the pool, the second uniform over the pool's digits
    of another class; then the motion, drawn like ``generate_moving_mnist``'s."""
    from ..data.video import bouncing_motion, render_digits

    rng = np.random.default_rng(seed)
    order = pool[np.argsort(labels[pool], kind="stable")]  # the pool sorted by class
    counts = np.bincount(labels[order], minlength=10)
    starts = np.cumsum(counts) - counts  # first position of each class in `order`
    a = rng.integers(0, len(order), size=n_clips)
    la = labels[order[a]]
    u = rng.integers(0, len(order) - counts[la])  # a position among the other classes
    b = np.where(u < starts[la], u, u + counts[la])
    which = np.stack([order[a], order[b]], axis=1)  # (N, 2)
    motion = bouncing_motion(rng, n_clips, frames, CLIP_DIGITS)
    clips = render_digits(mnist[which], motion.corners)  # mnist[which]: (N, 2, 28, 28)
    return LabelledClips(clips, which, motion.velocity, motion.corners)


def digit_pools(mnist: np.ndarray) -> dict[str, np.ndarray]:
    """MNIST image indices of each split, by a hash of the digit's pixels."""
    from ..data.images import _hash64

    frac = _fraction(_hash64([d.tobytes() for d in mnist], b"masklab-digit"))
    return {"eval": np.flatnonzero(frac < SELECT_FRACTION),
            "select": np.flatnonzero((frac >= SELECT_FRACTION) & (frac < 2 * SELECT_FRACTION)),
            "train": np.flatnonzero(frac >= 2 * SELECT_FRACTION)}


def _clip_targets(labels: np.ndarray, made: LabelledClips) -> tuple[np.ndarray, np.ndarray]:
    """(N, 10) float32 multi-hot of the two classes; (N, 4) float32 velocities, lower class first."""
    cls = labels[made.which]  # (N, 2)
    n = len(cls)
    multi_hot = np.zeros((n, 10), dtype=np.float32)
    multi_hot[np.arange(n)[:, None], cls] = 1.0
    first = np.argsort(cls, axis=1, kind="stable")  # (N, 2) slot of the lower class, then the higher
    velocity = np.take_along_axis(made.velocity, first[:, :, None], axis=1)  # (N, 2, 2)
    return multi_hot, velocity.reshape(n, 4).astype(np.float32)


def _clips(target: str) -> Callable[[_Request], _Rows]:
    def load(req: _Request) -> _Rows:
        from ..data.video import (
            MNIST_FILE,
            NATIVE_SIZE,
            check_image_size,
            clip_keys,
            load_mnist_digits,
            pool_frames,
        )

        size = req.image_size or NATIVE_SIZE
        check_image_size(size)
        for split, cap in req.caps.items():
            if cap < 1:
                raise ConfigError(f"transfer.max_{split}", cap, "must be >= 1 for a clip task (the clips generated)")
        images_path, labels_path = _data_file(req, MNIST_FILE), _data_file(req, MNIST_LABELS)
        mnist = load_mnist_digits(images_path)
        labels = _mnist_labels(labels_path)
        clips, multi_hot, velocity, parts, start = [], [], [], {}, 0
        for split, pool in digit_pools(mnist).items():
            made = labelled_moving_mnist(mnist, labels, pool, req.caps[split], req.frames, CLIP_SEEDS[split])
            clips.append(np.ascontiguousarray(pool_frames(made.clips, size)))
            mh, vel = _clip_targets(labels, made)
            multi_hot.append(mh)
            velocity.append(vel)
            parts[split] = np.arange(start, start + len(mh), dtype=np.int64)
            start += len(mh)
        x = np.concatenate(clips)
        y = np.concatenate(multi_hot if target == "multilabel" else velocity)
        names = [str(d) for d in range(10)] if target == "multilabel" else [
            "low_vy", "low_vx", "high_vy", "high_vx"]
        return _Rows(x, y, clip_keys(x), parts, names, y.shape[1],
                     f"moving-mnist from {images_path.name}: {req.frames} frames of {size}x{size}, {CLIP_DIGITS} "
                     f"digits of distinct classes; digit pools by pixel hash (eval < {SELECT_FRACTION} <= select "
                     f"< {2 * SELECT_FRACTION} <= train), seeds {CLIP_SEEDS}")

    return load


def _mnist_labels(path: Path) -> np.ndarray:
    import gzip

    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)


# ---------------------------------------------------------------- registry and loading


@dataclass(frozen=True)
class TaskSpec:
    input_kind: str
    target: str
    read: Callable[[_Request], _Rows]


TASKS: dict[str, TaskSpec] = {
    name: TaskSpec(TASK_INPUT_KIND[name], TASK_TARGET[name], read)
    for name, read in {
        "sst2": _sst2,
        "agnews": _agnews,
        "cifar10": _images("cifar10"),
        "tiny-imagenet": _images("tiny-imagenet"),
        "moving-mnist-digits": _clips("multilabel"),
        "moving-mnist-velocity": _clips("regression"),
    }.items()
}
assert set(TASKS) == set(TASK_INPUT_KIND), "names.py and tasks.py list different tasks"


def load_task(name: str, data_dir: Path, cache_dir: Path, *, max_train: int, max_select: int, max_eval: int,
              image_size: int = 0, frames: int = 16) -> TaskData:
    """The task ``name`` (see the module doc), each split capped at its ``max_*`` rows.

    For clip tasks the caps are the numbers of clips generated."""
    if name not in TASKS:
        raise ConfigError("transfer.tasks", name, f"allowed: {', '.join(TASKS)}")
    caps = {"train": max_train, "select": max_select, "eval": max_eval}
    for split, cap in caps.items():
        if cap < 0:
            raise ConfigError(f"transfer.max_{split}", cap, "must be >= 0 (0 = every row)")
    spec = TASKS[name]
    workspace = Workspace(output_dir=Path(cache_dir), data_dir=Path(data_dir))
    req = _Request(workspace, Path(cache_dir), caps, image_size, frames)
    rows = spec.read(req)
    index, note = _disjoint(rows.keys, rows.parts)
    index = {s: _cap(index[s], rows.keys, caps[s]) for s in index}
    splits = {s: Split(_take(rows.x, i), rows.y[i], rows.keys[i]) for s, i in index.items()}
    counts = ", ".join(f"{s} {len(splits[s]):,} of {len(rows.parts[s]):,}" for s in ("train", "select", "eval"))
    task = TaskData(name, spec.input_kind, spec.target, rows.num_outputs, rows.class_names,
                    splits["train"], splits["select"], splits["eval"], "")
    source = f"{rows.source}; dropped as duplicates {note}; kept (hash-smallest) {counts}; fp {fingerprint(task)}"
    return dataclasses.replace(task, source=source)


def _disjoint(keys: np.ndarray, parts: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    """Drop train and select rows whose key is in eval, and train rows whose key is in select."""
    ev = parts["eval"]
    select = parts["select"][~np.isin(keys[parts["select"]], keys[ev])]
    train = parts["train"][~np.isin(keys[parts["train"]], keys[ev])]
    n_train_eval = len(parts["train"]) - len(train)
    kept = train[~np.isin(keys[train], keys[select])]
    note = (f"train {n_train_eval:,} in eval + {len(train) - len(kept):,} in select, "
            f"select {len(parts['select']) - len(select):,} in eval")
    return {"train": kept, "select": select, "eval": ev}, note


def _cap(index: np.ndarray, keys: np.ndarray, cap: int) -> np.ndarray:
    """At most ``cap`` rows (0 = all): those with the smallest key, in their order."""
    if not cap or len(index) <= cap:
        return index
    smallest = np.argsort(keys[index].view(np.uint64), kind="stable")[:cap]
    return index[np.sort(smallest)]


def _take(x: Sequence, index: np.ndarray) -> list[str] | np.ndarray:
    if isinstance(x, list):
        return [x[i] for i in index]
    return np.ascontiguousarray(x[index])  # a memmap's rows are read here


# ---------------------------------------------------------------- reference levels


def chance(task: TaskData) -> float:
    """The score of guessing (``names.chance_level``): 1/classes; the 2 of 10 digits of
    a clip 1/45; R² 0.0."""
    return chance_level(task.name)


def fingerprint(task: TaskData) -> str:
    """12 hex digits of sha256 over every split's keys and targets: the rows a task read."""
    h = hashlib.sha256(task.name.encode())
    for split in (task.train, task.select, task.eval):
        h.update(np.ascontiguousarray(split.keys, dtype="<i8").tobytes())
        h.update(np.ascontiguousarray(split.y).tobytes())
    return h.hexdigest()[:12]
