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
import torch
from torch.utils.data import Sampler

from ..masking.rng import random_bits


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


def step_draw(seed: int, step: int, stream: int, batch_size: int, pool: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """The samples of training step ``step``: ``batch_size`` entries of ``pool`` drawn
    with replacement from ``(seed, step, stream)``. Returns (the step's key, the entries)."""
    key = torch.tensor([int(step)], dtype=torch.int64)
    bits = random_bits(seed, key, stream, (batch_size,))[0]  # (B,)
    return key, pool[(bits % len(pool)).numpy()]

