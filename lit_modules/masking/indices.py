"""Mask indices and the argument checks every masking strategy shares.

A mask is the k-th mask of a sample; ``k`` is its *mask index*:

- training uses indices below ``EVAL_MASK_BASE``: the epoch (text maskings: a new mask
  every epoch, RoBERTa's dynamic masking, or epoch % K for BERT's K static masks; see
  ``epoch_mask_index``) or the global step (patch and video maskings: a new mask every
  step, as MAE draws new noise per batch);
- evaluation scores the K fixed masks ``eval_mask_indices(K)``, a reserved range that
  training never reaches, so every trial is validated on the same masks.

Indices must lie in [0, MAX_MASK_INDEX): the text maskings derive TEXT_SLOTS stream ids
from each index (``rng.Stream``), and the hash keeps 32 bits of them.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING

from ..config_errors import ConfigError
from ..lazy import LazyModule
from .rng import TEXT_SLOTS

if TYPE_CHECKING:
    from torch import Tensor

torch = LazyModule("torch")  # imported on first use (lit_modules/lazy.py)

MAX_MASK_INDEX = (1 << 32) // TEXT_SLOTS
# Evaluation masks live in [EVAL_MASK_BASE, EVAL_MASK_BASE + MAX_EVAL_MASKS); training
# mask indices stay below EVAL_MASK_BASE, so the two never coincide.
EVAL_MASK_BASE = 1 << 28
MAX_EVAL_MASKS = 1 << 20
assert EVAL_MASK_BASE + MAX_EVAL_MASKS <= MAX_MASK_INDEX
STAGES = ("train", "val", "test", "predict")


def is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_float(name: str, value: object, lo: float, hi: float, lo_open: bool, hi_open: bool) -> None:
    """A config number in an interval (open or closed at each end), or a ConfigError."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        above = value > lo if lo_open else value >= lo
        below = value < hi if hi_open else value <= hi
        ok = above and below  # False for NaN
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ConfigError(name, value, f"must be a number in {interval}")


def check_static_masks(static_masks: object) -> None:
    if not is_int(static_masks) or not 0 <= static_masks < EVAL_MASK_BASE:
        raise ConfigError(
            "static_masks", static_masks,
            "must be an integer >= 0 (0 = a new mask every epoch, K = mask epoch % K)",
        )


def epoch_mask_index(epoch: int, static_masks: int = 0) -> int:
    """The training mask index of ``epoch``.

    ``static_masks = 0``: dynamic masking (RoBERTa), mask index = epoch, a new mask every
    epoch. ``static_masks = K > 0``: static masking (original BERT, whose data was
    duplicated K times with K masks), mask index = epoch % K.
    """
    if not is_int(epoch) or epoch < 0:
        raise ConfigError("epoch", epoch, "must be an integer >= 0")
    check_static_masks(static_masks)
    k = int(epoch) % static_masks if static_masks else int(epoch)
    if k >= EVAL_MASK_BASE:
        raise ConfigError("epoch", epoch, f"dynamic masking needs epoch < {EVAL_MASK_BASE} (the eval mask range)")
    return k


def eval_mask_indices(k: int) -> range:
    """The K fixed evaluation mask indices: ``range(EVAL_MASK_BASE, EVAL_MASK_BASE + K)``.

    Every trial scores the same K masks per validation sample, disjoint from any
    training mask, so validation losses differ only by the model, not by mask noise.
    """
    if not is_int(k) or not 1 <= k <= MAX_EVAL_MASKS:
        raise ConfigError("eval_masks", k, f"must be an integer in [1, {MAX_EVAL_MASKS}]")
    return range(EVAL_MASK_BASE, EVAL_MASK_BASE + int(k))


def check_mask_index(mask_index: Tensor | int, b: int) -> None:
    """An int, or an integer tensor of shape (B,) or (), in [0, MAX_MASK_INDEX)."""
    if isinstance(mask_index, torch.Tensor):
        if mask_index.shape not in ((b,), ()) or mask_index.dtype.is_floating_point or mask_index.dtype == torch.bool:
            raise ValueError(f"mask_index: must be an int or an integer tensor of shape ({b},), "
                             f"got {mask_index.dtype} {tuple(mask_index.shape)}")
        bad = bool(((mask_index < 0) | (mask_index >= MAX_MASK_INDEX)).any()) if mask_index.numel() else False
    elif is_int(mask_index):
        bad = not 0 <= mask_index < MAX_MASK_INDEX
    else:
        raise ValueError(f"mask_index = {mask_index!r}: must be an int or a (B,) integer tensor")
    if bad:
        raise ValueError(f"mask_index: must be in [0, {MAX_MASK_INDEX})")


def check_seed(seed: object) -> None:
    if not is_int(seed):
        raise ValueError(f"seed = {seed!r}: must be an integer")


def check_stage(stage: object) -> None:
    if stage not in STAGES:
        raise ValueError(f"stage = {stage!r}: allowed: {', '.join(STAGES)}")
