"""Training batches indexed by global step, served in epochs of one validation interval.

Every training dataset in masklab maps a *global step* to the whole batch of that step
(drawn from a generator seeded by ``(seed, step)``), so a run's batches do not depend on
workers, restarts or anything else it does. ``StepSampler`` hands those step indices to
the DataLoader in epochs of ``val_every`` steps: Lightning validates at each epoch end,
so ``current_epoch`` counts validations, which is the step that Optuna's Lightning
pruning callback reports intermediate values at. Lightning calls ``set_epoch`` on the
sampler at the start of every epoch (also after resuming from a checkpoint).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Dataset, Sampler

from ..masking.rng import Stream, step_bits


class StepSampler(Sampler[int]):
    def __init__(self, total_steps: int, steps_per_epoch: int):
        self.total_steps, self.steps_per_epoch = total_steps, max(1, min(steps_per_epoch, total_steps))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _range(self) -> range:
        start = self.epoch * self.steps_per_epoch
        return range(min(start, self.total_steps), min(start + self.steps_per_epoch, self.total_steps))

    def __iter__(self) -> Iterator[int]:
        return iter(self._range())

    def __len__(self) -> int:
        return len(self._range())


def step_draw(seed: int, step: int, stream: Stream, batch_size: int, pool: np.ndarray) -> np.ndarray:
    """The samples of training step ``step``: ``batch_size`` entries of ``pool`` drawn
    with replacement from the per-step ``stream`` at ``(seed, step)``."""
    return pool[(step_bits(seed, step, stream, batch_size) % len(pool)).numpy()]


class FixedBatches(Dataset):
    """Item ``i`` is the ``i``-th batch of the fixed rows ``index`` (validation and probe
    batches: in index order, never augmented); ``make_batch(rows)`` assembles one."""

    def __init__(self, make_batch, index: np.ndarray, batch_size: int):
        self.make_batch, self.index, self.batch_size = make_batch, index, batch_size

    def __len__(self) -> int:
        return -(-len(self.index) // self.batch_size)

    def __getitem__(self, i: int):
        return self.make_batch(self.index[i * self.batch_size : (i + 1) * self.batch_size])


class StepBatches(Dataset):
    """A training dataset of ``steps`` items, item ``step`` the batch of that step drawn
    from ``train_index`` of ``data`` (subclasses assemble it)."""

    def __init__(self, data, train_index: np.ndarray, cfg, seed: int, steps: int):
        self.data, self.train_index, self.cfg = data, train_index, cfg
        self.seed, self.steps = seed, steps

    def __len__(self) -> int:
        return self.steps
