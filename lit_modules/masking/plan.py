"""How a run's batches are masked, applied where they are assembled.

A model family turns its run config into a ``MaskPlan`` (``MaskedModelBase.mask_plan``):
which strategy masks training batches, which evaluation tasks score every trial (each a
strategy and K fixed masks), how a training step picks its mask index, and the steps a
mask-ratio schedule spans. The data pipeline applies the plan to every batch it
assembles (in DataLoader worker processes when there are any), so the training step
receives its masks ready:

- training: ``TrainItem(batch, masked, step)``; ``masked`` is None on steps that mask
  nothing (autoregressive fine-tuning after masked pretraining);
- evaluation: ``EvalItem(batch, views)``; ``views[task]`` holds the task's K masks of
  the batch (task "" is the common evaluation task every trial of a study shares).

The plan is plain frozen data (picklable to worker processes) and a pure function of
(batch, step): the same batch gets the same masks whatever the number of workers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from . import MaskContext, MaskedBatch, MaskingStrategy
from .batches import Clips, Images, Movable
from .indices import eval_mask_indices

COMMON = ""  # the name of the common evaluation task


@dataclass(frozen=True)
class TrainItem(Movable):
    """What a training step receives: the batch, its masks (None: nothing is masked at
    this step) and the global step they were drawn for.

    ``scored``: (M,) int64, the flat (row-major) positions where ``masked.loss_mask`` is
    True, listed where the batch is assembled, so a model that scores only those positions
    gathers them with ``gather_scored`` without asking the device how many there are
    (a boolean-mask gather would: a host sync every step on a GPU). None when every
    position is scored or nothing is masked."""

    batch: Any
    masked: MaskedBatch | None
    step: int
    scored: Any = None

    def where_scored(self):
        """The scored positions for ``gather_scored``: the listed ones, else the mask."""
        return self.scored if self.scored is not None else self.masked.loss_mask


@dataclass(frozen=True)
class EvalItem(Movable):
    """What a validation step receives: the batch and, per evaluation task, its K masks."""

    batch: Any
    views: dict[str, tuple[MaskedBatch, ...]] = field(default_factory=dict)

    @property
    def common(self) -> tuple[MaskedBatch, ...]:
        """The K masks of the common evaluation task (empty when nothing is masked)."""
        return self.views.get(COMMON, ())


@dataclass(frozen=True)
class MaskPlan:
    """A run's masking, from its config.

    seed:            the run's global seed.
    train:           the training strategy (None: training masks nothing).
    evaluation:      (task name, strategy) pairs scored at every validation; task ""
                     is the common task.
    eval_masks:      K, the fixed evaluation masks per sample and task.
    steps_per_epoch: training steps per epoch (one validation interval): epoch = step //
                     steps_per_epoch, for strategies that draw a new mask per epoch.
    masked_steps:    (first, last) training steps that are masked; a mask-ratio schedule
                     runs from its initial ratio at ``first`` to its final one at ``last``.
    grid:            the patch or tubelet grid of image and video batches (the model's).
    """

    seed: int
    train: MaskingStrategy | None
    evaluation: tuple[tuple[str, MaskingStrategy], ...] = ()
    eval_masks: int = 1
    steps_per_epoch: int = 1
    masked_steps: tuple[int, int] = (0, 0)
    grid: tuple[int, ...] | None = None

    def prepare(self, batch):
        """The typed batch with the model's grid set (image and video batches)."""
        if isinstance(batch, (Images, Clips)) and self.grid is not None and batch.grid != self.grid:
            return dataclasses.replace(batch, grid=self.grid)
        return batch

    def train_context(self, step: int) -> MaskContext:
        """The context of training step ``step``: its mask index and schedule position."""
        first, last = self.masked_steps
        index = self.train.training_index(step, step // max(1, self.steps_per_epoch))
        return MaskContext(self.seed, index, step - first, max(1, last - first), "train")

    def train_item(self, batch, step: int) -> TrainItem:
        batch = self.prepare(batch)
        first, last = self.masked_steps
        if self.train is None or not first <= step <= last:
            return TrainItem(batch, None, step)
        masked = self.train(batch, self.train_context(step))
        return TrainItem(batch, masked, step, scored_positions(masked.loss_mask))

    def eval_item(self, batch) -> EvalItem:
        batch = self.prepare(batch)
        indices = eval_mask_indices(self.eval_masks)
        views = {name: tuple(s(batch, MaskContext(self.seed, k, stage="val")) for k in indices)
                 for name, s in self.evaluation}
        return EvalItem(batch, views)


def scored_positions(loss_mask):
    """(M,) int64 flat positions of the True entries of ``loss_mask`` (row-major, the
    order of a boolean-mask gather); None when every entry is True."""
    if bool(loss_mask.all()):  # the data pipeline's tensors are on the host: no device to wait for
        return None
    return loss_mask.reshape(-1).nonzero().squeeze(1)


def gather_scored(x, where):
    """``x`` (B, T, ...) at the scored positions -> (M, ...), row-major. ``where`` is a
    (M,) index from ``scored_positions`` (a gather of known size: no host sync) or a
    (B, T) bool mask (a boolean-mask gather: the device reports M to the host first)."""
    import torch

    if where.dtype == torch.bool:
        return x[where]
    return x.reshape(-1, *x.shape[2:]).index_select(0, where)


def scatter_scored(x, where, values):
    """``x`` (B, T) with ``values`` (M,) written at the scored positions (a copy)."""
    import torch

    if where.dtype == torch.bool:
        out = x.clone()
        out[where] = values
        return out
    return x.reshape(-1).index_copy(0, where, values).view_as(x)


__all__ = ["COMMON", "EvalItem", "MaskPlan", "TrainItem", "gather_scored", "scatter_scored", "scored_positions"]
