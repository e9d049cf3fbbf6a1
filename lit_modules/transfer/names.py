"""The labelled tasks by name: what each reads and predicts (no torch, no data: config
validation reads this). The loaders are in ``tasks.py``."""

from __future__ import annotations

# task -> the inputs it reads: text rows, images, or grayscale clips.
TASK_INPUT_KIND: dict[str, str] = {
    "sst2": "text",
    "agnews": "text",
    "cifar10": "image",
    "tiny-imagenet": "image",
    "moving-mnist-digits": "clip",
    "moving-mnist-velocity": "clip",
}

# task -> what is predicted: one class, a set of labels, or real values.
TASK_TARGET: dict[str, str] = {
    "sst2": "class",
    "agnews": "class",
    "cifar10": "class",
    "tiny-imagenet": "class",
    "moving-mnist-digits": "multilabel",
    "moving-mnist-velocity": "regression",
}


# task -> its classes (label-set tasks: the labels; regression: 0).
TASK_CLASSES: dict[str, int] = {
    "sst2": 2, "agnews": 4, "cifar10": 10, "tiny-imagenet": 200, "moving-mnist-digits": 10,
    "moving-mnist-velocity": 0,
}
DIGITS_PER_CLIP = 2  # moving-mnist transfer clips: two digits of distinct classes


def chance_level(task: str) -> float:
    """The score of guessing: 1/classes; a set of 2 of 10 digits 1/45; R² 0."""
    if TASK_TARGET[task] == "regression":
        return 0.0
    if TASK_TARGET[task] == "multilabel":
        from math import comb

        return 1.0 / comb(TASK_CLASSES[task], DIGITS_PER_CLIP)
    return 1.0 / TASK_CLASSES[task]


TASK_DESCRIPTION: dict[str, str] = {
    "sst2": "SST-2 sentiment, 2 classes (train.tsv to fit, dev.tsv to choose, test.tsv to score); text models.",
    "agnews": "AG News topics, 4 classes (dev.tsv split by content hash to fit and choose, test.tsv to score); text models.",
    "cifar10": "CIFAR-10, 10 classes (the JPEGs split by content hash); image models.",
    "tiny-imagenet": "Tiny-ImageNet-200, 200 classes (split by content hash as an image run splits it); image models.",
    "moving-mnist-digits": "which 2 of the 10 digits move in a Moving-MNIST clip (set accuracy); video models.",
    "moving-mnist-velocity": "each digit's velocity in a Moving-MNIST clip (R²); video models.",
}


def score_name(task: str) -> str:
    """The probe's score: accuracy (classes, label sets) or R² (regression)."""
    return "r2" if TASK_TARGET[task] == "regression" else "acc"


def probe_metric(task: str, feature: str, primary: str) -> str:
    """``transfer/<task>/probe_acc`` for the primary feature, ``..._<feature>`` for others."""
    base = f"transfer/{task}/probe_{score_name(task)}"
    return base if feature == primary else f"{base}_{feature}"
