"""Baselines of a labelled task: what a probe on learned features has to beat.

- ``majority``: the train split's most frequent answer, scored on eval: the majority
  class (accuracy); the k most frequent labels (set accuracy, k = the labels a train row
  has: 2 for moving-mnist); the train mean (R², the mean over outputs as in sklearn's
  ``r2_score``).
- ``tfidf`` (text): TF-IDF of word unigrams and bigrams (sublinear tf, min_df 2) and a
  logistic regression; C chosen on the select split from ``TFIDF_C``, eval accuracy.
- ``pixels`` (images and clips): the raw pixels in [0, 1], area-downsampled to at most
  32x32 per image (16x16 per frame of a clip), flattened and given to the run's probe.

Deterministic: no random state (lbfgs from zeros; fixed iteration limits).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..paths import atomic_write
from .tasks import TaskData

Probe = Callable[..., float]  # probe(train_x, train_y, select_x, select_y, eval_x, eval_y, target, num_outputs)

# Inverse regularization strengths tried for the TF-IDF logistic regression: a factor-4
# grid around sklearn's default C = 1. The select split picks C = 4 on AG News (9,011
# train rows) and C = 16 on the whole SST-2 train; C = 64 was never better and costs as
# much time as the rest of the grid together.
TFIDF_C = (0.25, 1.0, 4.0, 16.0)
TFIDF_MAX_ITER = 1000  # lbfgs iterations; enough to converge on every grid point
IMAGE_SIDE = 32  # raw-pixel baseline: images area-downsampled to at most 32x32 (3,072 features)
FRAME_SIDE = 16  # clips: each frame to at most 16x16 (256 features per frame)
CACHE_VERSION = 1  # bump when a baseline's definition changes


def baselines(task: TaskData, probe: Probe) -> dict[str, float]:
    """{"majority": ..., "tfidf" (text) or "pixels" (images, clips): ...}."""
    out = {"majority": majority(task)}
    if task.input_kind == "text":
        out["tfidf"] = tfidf(task)
    else:
        x = {s: pixel_features(getattr(task, s).x, task.input_kind) for s in ("train", "select", "eval")}
        out["pixels"] = float(probe(x["train"], task.train.y, x["select"], task.select.y, x["eval"], task.eval.y,
                                    task.target, task.num_outputs))
    return out


def majority(task: TaskData) -> float:
    """Eval score of always answering the train split's most frequent answer."""
    train, ev = np.asarray(task.train.y), np.asarray(task.eval.y)
    if task.target == "class":
        top = np.bincount(train, minlength=task.num_outputs).argmax()
        return float(np.mean(ev == top))
    if task.target == "multilabel":
        k = int(round(float(train.sum(1).mean())))
        top = np.argsort(-train.sum(0), kind="stable")[:k]  # ties: the lower label
        guess = np.zeros(task.num_outputs, dtype=bool)
        guess[top] = True
        return float(np.mean(np.all((ev > 0.5) == guess, axis=1)))
    from sklearn.metrics import r2_score

    return float(r2_score(ev, np.broadcast_to(train.mean(0), ev.shape)))


def tfidf(task: TaskData) -> float:
    """Eval accuracy of TF-IDF + logistic regression, C chosen on the select split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    xt = vec.fit_transform(task.train.x)
    xs, xe = vec.transform(task.select.x), vec.transform(task.eval.x)
    best, best_acc = None, -1.0
    # One BLAS thread: sparse lbfgs gains nothing from more, and on a busy 2-core machine
    # the default thread pool made AG News 4x slower (24 s instead of 6 s).
    with threadpool_limits(limits=1):
        for c in TFIDF_C:
            model = LogisticRegression(C=c, max_iter=TFIDF_MAX_ITER).fit(xt, task.train.y)
            acc = float(np.mean(model.predict(xs) == task.select.y))
            if acc > best_acc:  # ties: the smaller C (stronger regularization)
                best, best_acc = model, acc
        return float(np.mean(best.predict(xe) == task.eval.y))


def pixel_features(x: np.ndarray, input_kind: str) -> np.ndarray:
    """Images (N, H, W, 3) or clips (N, F, H, W) uint8 -> (N, D) float32 in [0, 1],
    each image (frame) area-downsampled to at most ``IMAGE_SIDE`` (``FRAME_SIDE``) a side."""
    x = np.asarray(x)
    h_axis, side = (1, IMAGE_SIDE) if input_kind == "image" else (2, FRAME_SIDE)  # axis of H
    x = _area_pool(x.astype(np.float32), h_axis, side)
    x = _area_pool(x, h_axis + 1, side)
    return (x / 255.0).reshape(len(x), -1).astype(np.float32)


def _area_pool(x: np.ndarray, axis: int, side: int) -> np.ndarray:
    """Mean over ``side`` equal-as-possible bins of ``axis`` (unchanged if not longer)."""
    n = x.shape[axis]
    if n <= side:
        return x
    edges = np.linspace(0, n, side + 1).round().astype(np.int64)  # bin boundaries
    sums = np.add.reduceat(x, edges[:-1], axis=axis)
    shape = [1] * x.ndim
    shape[axis] = side
    return sums / np.diff(edges).reshape(shape)


def cached_baselines(task: TaskData, probe: Probe, cache_dir: Path, key: str) -> dict[str, float]:
    """``baselines(task, probe)``, kept in ``cache_dir/transfer/baselines-<hash>.json``."""
    return cached(cache_dir, "baselines", key, lambda: baselines(task, probe))


def cached(cache_dir: Path, prefix: str, key: str, compute: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``compute()``, kept in ``cache_dir/transfer/<prefix>-<hash>.json`` (written
    atomically). ``key`` names everything the numbers depend on (task, caps, the data's
    fingerprint, the probe, a model config); it is stored in the file and must match
    for the file to be used."""
    stamp = f"v{CACHE_VERSION}|{key}"
    path = Path(cache_dir) / "transfer" / f"{prefix}-{hashlib.sha256(stamp.encode()).hexdigest()[:20]}.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == stamp:
            return {k: float(v) for k, v in stored["values"].items()}
    values = {k: float(v) for k, v in compute().items()}
    atomic_write(path, json.dumps({"key": stamp, "values": values}, indent=1).encode())
    return values
