"""Labelled transfer tasks (lit_modules/transfer/tasks.py) and their baselines (baselines.py)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from lit_modules.config_errors import ConfigError
from lit_modules.data.video import (
    DIGIT_SIZE,
    MNIST_FILE,
    NATIVE_SIZE,
    generate_moving_mnist,
    load_mnist_digits,
)
from lit_modules.transfer.baselines import (
    baselines,
    cached_baselines,
    majority,
    pixel_features,
    tfidf,
)
from lit_modules.transfer.tasks import (
    CLIP_SEEDS,
    MNIST_LABELS,
    TASK_INPUT_KIND,
    TASKS,
    chance,
    digit_pools,
    labelled_moving_mnist,
    load_task,
    text_keys,
)

CAPS = {"max_train": 60, "max_select": 20, "max_eval": 30}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One cache for the module: the images are decoded once."""
    return tmp_path_factory.mktemp("transfer-cache")


def load(name, data_dir, cache_dir, **kw):
    return load_task(name, data_dir, cache_dir, **{**CAPS, **kw})


def splits(task):
    return {"train": task.train, "select": task.select, "eval": task.eval}


# ---------------------------------------------------------------- every task


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_loads_capped_disjoint_and_deterministic(name, data_dir, cache_dir):
    task = load(name, data_dir, cache_dir)
    assert task.input_kind == TASK_INPUT_KIND[name]
    for s, split in splits(task).items():
        assert len(split) == CAPS[f"max_{s}"], s
        assert len(split.x) == len(split.y) == len(split.keys)
        assert split.keys.dtype == np.int64
    keys = {s: set(split.keys.tolist()) for s, split in splits(task).items()}
    assert not keys["train"] & keys["eval"]
    assert not keys["train"] & keys["select"]
    assert not keys["select"] & keys["eval"]
    again = load(name, data_dir, cache_dir)
    for s, split in splits(task).items():
        other = getattr(again, s)
        np.testing.assert_array_equal(split.keys, other.keys)
        np.testing.assert_array_equal(split.y, other.y)
        if task.input_kind == "text":
            assert split.x == other.x
        else:
            np.testing.assert_array_equal(split.x, other.x)
    assert task.source == again.source and "\n" not in task.source


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_shapes_and_dtypes(name, data_dir, cache_dir):
    task = load(name, data_dir, cache_dir)
    x, y = task.train.x, task.train.y
    if task.input_kind == "text":
        assert isinstance(x, list) and all(isinstance(t, str) and t for t in x)
    elif task.input_kind == "image":
        assert x.dtype == np.uint8 and x.ndim == 4 and x.shape[-1] == 3
    else:
        assert x.dtype == np.uint8 and x.shape[1:] == (16, NATIVE_SIZE, NATIVE_SIZE)
    if task.target == "class":
        assert y.dtype == np.int64 and y.ndim == 1
        assert 0 <= y.min() and y.max() < task.num_outputs == len(task.class_names)
    else:
        assert y.dtype == np.float32 and y.shape == (len(x), task.num_outputs)


def test_text_keys_ignore_case_and_outer_space():
    a, b, c = text_keys(["A good film ", "a good film", "a good film!"])
    assert a == b != c


def test_caps_keep_the_hash_smallest_rows_in_order(data_dir, cache_dir):
    full = load("agnews", data_dir, cache_dir, max_train=0, max_select=0, max_eval=0)
    capped = load("agnews", data_dir, cache_dir)
    for s, split in splits(capped).items():
        every = getattr(full, s).keys
        smallest = np.sort(every.view(np.uint64))[: len(split)]
        assert set(split.keys.view(np.uint64).tolist()) == set(smallest.tolist())
        rest = iter(every.tolist())
        assert all(k in rest for k in split.keys.tolist()), f"{s}: not in file order"  # a subsequence


def test_sst2_train_rows_seen_in_select_or_eval_are_dropped(data_dir, cache_dir):
    task = load("sst2", data_dir, cache_dir, max_train=0, max_select=0, max_eval=0)

    def file_keys(name):
        lines = (data_dir / "sst-2" / name).read_text().splitlines()[1:]
        return text_keys([line.rpartition("\t")[0] for line in lines])

    train, dev, test = file_keys("train.tsv"), file_keys("dev.tsv"), file_keys("test.tsv")
    dropped = np.isin(train, np.concatenate([dev, test]))
    assert dropped.sum() == 75  # phrases of train.tsv that are also dev.tsv rows; none are test rows
    assert len(task.train) == len(train) - dropped.sum()
    assert len(task.select) == len(dev) and len(task.eval) == len(test) == 872
    assert "75 in select" in task.source


def test_image_eval_is_the_split_a_default_image_run_holds_out(data_dir, cache_dir):
    from lit_modules.data.configs import ImageDataConfig
    from lit_modules.data.images import Cifar10
    from lit_modules.paths import Workspace

    dm = Cifar10(ImageDataConfig(name="cifar10"), 0, 0, 1, Workspace(cache_dir, data_dir))
    dm.setup()
    task = load("cifar10", data_dir, cache_dir, max_train=0, max_select=0, max_eval=0)
    held_out = set(dm.data.keys[dm.val_split].tolist())
    assert set(task.eval.keys.tolist()) == held_out
    pretrained = set(dm.data.keys[dm.train_index].tolist())
    assert set(task.train.keys.tolist()) | set(task.select.keys.tolist()) == pretrained
    assert 0.07 < len(task.select) / 10_000 < 0.13  # the hash fraction in [0.1, 0.2)


# ---------------------------------------------------------------- moving-mnist


def mnist(data_dir):
    import gzip

    with gzip.open(data_dir / MNIST_LABELS) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return load_mnist_digits(data_dir / MNIST_FILE), labels


def test_moving_mnist_digits_two_distinct_classes(data_dir, cache_dir):
    task = load("moving-mnist-digits", data_dir, cache_dir)
    for split in splits(task).values():
        assert np.all(split.y.sum(1) == 2)  # two ones: two digits of distinct classes
        assert set(np.unique(split.y).tolist()) == {0.0, 1.0}
    assert chance(task) == pytest.approx(1 / 45)


def test_moving_mnist_digit_pools_are_disjoint(data_dir):
    images, _ = mnist(data_dir)
    pools = digit_pools(images)
    content = {s: {images[i].tobytes() for i in idx} for s, idx in pools.items()}
    assert not content["train"] & content["eval"] and not content["select"] & content["eval"]
    assert not content["train"] & content["select"]
    assert sum(len(p) for p in pools.values()) == len(images)
    assert 0.07 < len(pools["eval"]) / len(images) < 0.13 and 0.07 < len(pools["select"]) / len(images) < 0.13


def test_moving_mnist_targets_match_the_clips(data_dir, cache_dir):
    """The clips of a split are the generator's, with each digit drawn where its motion
    says; the targets are the classes and the frame-0 velocities of those digits."""
    images, labels = mnist(data_dir)
    n = CAPS["max_eval"]
    made = labelled_moving_mnist(images, labels, digit_pools(images)["eval"], n, 16, CLIP_SEEDS["eval"])
    digits = load("moving-mnist-digits", data_dir, cache_dir).eval
    velocity = load("moving-mnist-velocity", data_dir, cache_dir).eval
    np.testing.assert_array_equal(digits.x, made.clips)
    np.testing.assert_array_equal(velocity.x, made.clips)
    cls = labels[made.which]  # (N, 2)
    assert np.all(cls[:, 0] != cls[:, 1])
    expect = np.zeros((n, 10), np.float32)
    expect[np.arange(n)[:, None], cls] = 1
    np.testing.assert_array_equal(digits.y, expect)
    low = np.argmin(cls, axis=1)
    rows = np.arange(n)
    np.testing.assert_allclose(velocity.y[:, :2], made.velocity[rows, low], rtol=1e-6)
    np.testing.assert_allclose(velocity.y[:, 2:], made.velocity[rows, 1 - low], rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(velocity.y.reshape(n, 2, 2), axis=-1), 0.1, rtol=1e-6)
    # the pixels: every digit sits at its corner in every frame (digits combine by max)
    for i in range(n):
        for f in range(16):
            for d in range(2):
                y, x = made.corners[i, f, d]
                patch = made.clips[i, f, y:y + DIGIT_SIZE, x:x + DIGIT_SIZE]
                assert np.all(patch >= images[made.which[i, d]])
    # the motion: frame 1 is frame 0 moved by the velocity (in 36-px units), unless it bounced
    free = NATIVE_SIZE - DIGIT_SIZE
    step = made.corners[:, 1] - made.corners[:, 0]  # (N, 2, 2) pixels
    start = made.corners[:, 0] / free
    inside = np.all((start + made.velocity > 0) & (start + made.velocity < 1), axis=-1)  # (N, 2)
    assert inside.sum() > n  # most digits do not touch a border in their first step
    assert np.all(np.abs(step - made.velocity * free)[inside] <= 1.0)


def test_moving_mnist_pools_images_when_asked(data_dir, cache_dir):
    task = load("moving-mnist-velocity", data_dir, cache_dir, image_size=32, frames=4)
    assert task.eval.x.shape == (CAPS["max_eval"], 4, 32, 32)


GOLDEN_MOVING_MNIST = {  # sha256 of the clips before generate_moving_mnist was split into motion + rendering
    (40, 6, 2): "be70824c0beed8f7703804565867dc07ae25036141aa9a169cad0318b5a82581",
    (7, 20, 3): "d9f117512eb0595a5953a348afd83ca640321a50c2f4e93d584bf90a7b91ae7d",
    (5, 3, 1): "ee860802e9c11800359d4d486084c03e8e6187a3737553ca8e5c1d5b0cf20e65",
}


def test_generate_moving_mnist_unchanged_by_the_refactor(data_dir):
    images = load_mnist_digits(data_dir / MNIST_FILE)
    for args, digest in GOLDEN_MOVING_MNIST.items():
        assert hashlib.sha256(generate_moving_mnist(images, *args).tobytes()).hexdigest() == digest, args


# ---------------------------------------------------------------- baselines


def test_tfidf_on_ag_news(data_dir, cache_dir):
    """Measured: 0.8703 eval accuracy (C = 4 chosen on the select split) with the whole
    dev.tsv (9,011 train and 978 select rows after dropping duplicates) and all 7,600
    test rows. Published word-n-gram TF-IDF + logistic regression with the full 120,000
    train rows: 92.36% (Zhang et al. 2015); with 13x fewer rows a few points lower is
    expected. The range allows solver drift across scikit-learn versions and catches
    a broken text pipeline (bag of words without bigrams or entities left raw still
    lands above 0.85; shuffled labels or a wrong split do not)."""
    task = load("agnews", data_dir, cache_dir, max_train=0, max_select=0, max_eval=0)
    assert (len(task.train), len(task.select), len(task.eval)) == (9011, 978, 7600)
    start = time.monotonic()
    acc = tfidf(task)
    assert 0.85 <= acc <= 0.89, acc
    assert time.monotonic() - start < 60


def test_majority_is_the_most_frequent_train_class(data_dir, cache_dir):
    task = load("agnews", data_dir, cache_dir, max_train=400, max_select=50, max_eval=500)
    top = np.bincount(task.train.y).argmax()
    assert majority(task) == pytest.approx(np.mean(task.eval.y == top))
    assert chance(task) == 0.25
    labels = load("moving-mnist-digits", data_dir, cache_dir)
    top2 = np.argsort(-labels.train.y.sum(0), kind="stable")[:2]
    hits = np.mean(labels.eval.y[:, top2].sum(1) == 2)
    assert majority(labels) == pytest.approx(hits)
    velocity = load("moving-mnist-velocity", data_dir, cache_dir)
    assert chance(velocity) == 0.0
    y, mean = velocity.eval.y.astype(np.float64), velocity.train.y.mean(0)
    r2 = 1 - ((y - mean) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)  # per output
    assert majority(velocity) == pytest.approx(r2.mean()) and majority(velocity) <= 0.0


def stand_in_probe(train_x, train_y, select_x, select_y, eval_x, eval_y, target, num_outputs):
    """A simple stand-in for transfer.probe.fit_probe(...).score: penalty on select, score on eval."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import r2_score

    if target == "class":
        fits = [LogisticRegression(C=c, max_iter=200).fit(train_x, train_y) for c in (0.01, 0.1)]
        best = max(fits, key=lambda m: np.mean(m.predict(select_x) == select_y))
        return float(np.mean(best.predict(eval_x) == eval_y))
    fits = [Ridge(alpha=a).fit(train_x, train_y) for a in (1.0, 100.0)]
    if target == "regression":
        best = max(fits, key=lambda m: r2_score(select_y, m.predict(select_x)))
        return float(r2_score(eval_y, best.predict(eval_x)))
    top2 = lambda m, x: np.argsort(-m.predict(x), axis=1)[:, :2]  # noqa: E731
    hit = lambda m, x, y: np.mean(np.take_along_axis(y, top2(m, x), 1).sum(1) == 2)  # noqa: E731
    best = max(fits, key=lambda m: hit(m, select_x, select_y))
    return float(hit(best, eval_x, eval_y))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # the stand-in probe
def test_pixel_baseline_beats_chance_on_cifar10(data_dir, cache_dir):
    task = load("cifar10", data_dir, cache_dir, max_train=1000, max_select=200, max_eval=500)
    out = baselines(task, stand_in_probe)
    assert set(out) == {"majority", "pixels"}
    assert out["pixels"] > 2 * chance(task)


def test_pixel_features_area_downsample():
    img = np.arange(64 * 64 * 3, dtype=np.float64).reshape(1, 64, 64, 3) % 256
    img = img.astype(np.uint8)
    feats = pixel_features(img, "image")
    expect = img.astype(np.float32).reshape(1, 32, 2, 32, 2, 3).mean((2, 4)) / 255
    np.testing.assert_allclose(feats, expect.reshape(1, -1), rtol=1e-6)
    clips = np.zeros((2, 5, 64, 64), np.uint8)
    assert pixel_features(clips, "clip").shape == (2, 5 * 16 * 16)
    small = np.zeros((3, 32, 32, 3), np.uint8)
    assert pixel_features(small, "image").shape == (3, 32 * 32 * 3)
    odd = np.full((1, 48, 48, 3), 255, np.uint8)  # not a multiple of 32: bins of 1 or 2 px
    np.testing.assert_allclose(pixel_features(odd, "image"), 1.0)


def test_baselines_are_cached(data_dir, cache_dir, tmp_path):
    task = load("moving-mnist-velocity", data_dir, cache_dir, frames=4)
    first = cached_baselines(task, stand_in_probe, tmp_path, "velocity|caps")
    assert set(first) == {"majority", "pixels"}
    files = list((tmp_path / "transfer").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["values"] == first

    def refuse(*args):
        raise AssertionError("the cached value must be read back")

    assert cached_baselines(task, refuse, tmp_path, "velocity|caps") == first
    with pytest.raises(AssertionError):
        cached_baselines(task, refuse, tmp_path, "velocity|other caps")


# ---------------------------------------------------------------- errors and imports


def test_unknown_task_is_a_one_line_error(data_dir, cache_dir):
    with pytest.raises(ConfigError) as e:
        load("imagenet", data_dir, cache_dir)
    msg = str(e.value)
    assert msg.startswith("transfer.tasks = 'imagenet': allowed: ") and "sst2" in msg and "\n" not in msg


@pytest.mark.parametrize("name", ["sst2", "cifar10", "moving-mnist-digits"])
def test_missing_file_is_a_one_line_error(name, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_task(name, tmp_path / "nowhere", tmp_path / "cache", **CAPS)
    msg = str(e.value)
    assert "file not found" in msg and "nowhere" in msg and "\n" not in msg


def test_task_names_import_no_torch():
    code = ("import sys; from lit_modules.transfer.tasks import TASK_INPUT_KIND, TASKS; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(len(TASKS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(len(TASK_INPUT_KIND))
